"""`segrec frontend`: the reference recommender web page."""

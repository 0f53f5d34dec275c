"""Offline evaluation: ranking metrics, baselines, `segrec evaluate`, its report."""

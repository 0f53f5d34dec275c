"""User segments after training: their document, descriptions, quality, drift and report.

    document        segments.json: the only module that reads and writes it
    profiles        what each segment is (top categories and items by lift, attributes, label)
    quality         silhouette, Davies-Bouldin, ARI/NMI, Ward and DBSCAN comparisons
    drift           mini-batch k-means updates, migration matrix, PSI, centroid shift, verdicts
    embeddings      user embeddings + segments as the refresh and the report exchange them
    segment_report  `segrec segments report`: markdown, HTML, JSON and figures
"""

"""`segrec export`: signatures, retrieval index, the export layout and the exporter."""

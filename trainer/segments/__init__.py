"""User segments: the segments.json document, profiles, quality, drift, and the segment report."""

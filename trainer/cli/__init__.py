"""The `segrec` command line and the demo: the top layer, the only code that imports every package."""

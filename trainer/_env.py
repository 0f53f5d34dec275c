"""Process-wide settings that must be in place before TensorFlow is imported.

TensorFlow Recommenders is written against tf-keras (Keras 2), so `tf.keras`
must resolve to tf-keras; keras-hub (the BERT encoder) is Keras 3 and is
imported as `keras`. Every package of segrec imports this module first, so
whichever package a process imports first, the setting is in place before
`import tensorflow` runs. It is the one place segrec touches the environment
outside its CLI entry points.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# Nothing downloads at run time: the pretrained encoder comes from an
# installed package or a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Keep TensorFlow's C++ start-up chatter (CPU feature notices) off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

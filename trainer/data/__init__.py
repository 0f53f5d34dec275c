"""The dataset dir contract: query/example building, tf.data input, numpy arrays of a split."""

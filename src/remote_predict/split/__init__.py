"""Splitting a Keras model across servers: sharded embedding tables, and cuts for shared sub-graphs."""

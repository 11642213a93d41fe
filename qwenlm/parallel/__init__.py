"""Tensor parallelism at the model level: the sharding plan (`tp`), the collectives (`layers`), a rank's model
built from a checkpoint folder (`model`)."""

"""The teacher-target cache: the frozen VFM's outputs for K replayable global views per sample.

``spec`` says what a cache depends on (store, teacher, global-view settings) and checks it,
``codec`` stores targets as fp16 or int8, ``build`` computes a cache shard by shard and
assembles it, ``reader`` serves it to training.
"""

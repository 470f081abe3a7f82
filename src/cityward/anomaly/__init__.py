"""Streaming anomaly and incident detection on city sensor streams.

- :mod:`cityward.anomaly.detectors`: detectors with a streaming interface (``score_one`` then
  ``learn_one``, one value at a time, no look-ahead), as self-registering plugins;
- :mod:`cityward.anomaly.nab`: the Numenta Anomaly Benchmark's scoring rules, our own
  implementation, and the ``cityward anomaly nab`` evaluation;
- :mod:`cityward.anomaly.service`: the alerting service that follows the data bank's change
  feed and writes NGSI-LD ``Alert`` entities.
"""

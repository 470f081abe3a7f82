"""Camera analytics that anonymize at the edge: detect, track, count and flag incidents.

A camera's frames flow through one stage after another (source, motion gate, detector,
tracker, anonymizer, analytics, emitter), each carrying one :class:`~cityward.vision.detections.
Detections`. Raw frames never leave the worker: only anonymized frames are encoded, stored or
streamed, and only counts and events reach the data bank. Tracks live in worker memory only.
Nothing here identifies anyone (no face matching, no plate reading, no re-identification).
"""

"""The demo: the main job on embedded defaults, end to end on loopback (``... demo``)."""

"""Sotto: privacy-first interest signals from voice.

This package is the contract the device (``sotto.edge``) and the aggregator (``sotto.server``) share and
neither owns: the generated wire code (``sotto.v1``), the wire rules (``sotto.wire``), the policy tables
(``sotto.policy``, data in ``sotto.models``) and the maths of randomized response (``sotto.ldp_math``).
The device never imports the aggregator and the aggregator never imports the device.
"""

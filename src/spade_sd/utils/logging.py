"""The package's logger: info-level messages say what starts, how long it took and what was added."""

from __future__ import annotations

import logging

logger = logging.getLogger("spade_sd")

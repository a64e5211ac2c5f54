"""Settings read from the environment, checked: a bad value raises ValueError naming the
variable, instead of failing later somewhere far from the cause."""
from __future__ import annotations

import math

# The largest timeout accepted (about 31 years). Longer waits overflow the clocks that
# threading and socket timeouts use; anything that large means "wait for ever" anyway.
MAX_TIMEOUT_S = 1e9


def parse_timeout(text: str) -> float:
    """TOPOCOMM_TIMEOUT's value: `text`, seconds as a decimal number ("300", "2.5", " 60 "),
    returned as a float in (0, MAX_TIMEOUT_S]. Raises ValueError("TOPOCOMM_TIMEOUT: ...")
    for anything else: not a number ("abc", ""), zero, negative, inf, nan, or too large."""
    shown = repr(text)
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"TOPOCOMM_TIMEOUT: expected a number of seconds, got {shown}") from None
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"TOPOCOMM_TIMEOUT: must be a finite number of seconds, got {shown}")
    if value <= 0:
        raise ValueError(f"TOPOCOMM_TIMEOUT: must be more than 0 seconds, got {shown}")
    if value > MAX_TIMEOUT_S:
        raise ValueError(f"TOPOCOMM_TIMEOUT: must be at most {MAX_TIMEOUT_S:g} seconds, "
                         f"got {shown}")
    return value

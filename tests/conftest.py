"""Test-wide settings.

Property tests run on 2-core CI machines that are busy with the end-to-end
tests' processes, so Hypothesis must not judge by wall-clock speed: no
per-example deadline and no "input generation is slow" health check. The
number of examples is set per test (PSYCHE_FULL=1 raises it where supported).
"""

from hypothesis import HealthCheck, settings

settings.register_profile("psyche", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("psyche")

"""Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default dev).

dev: quick local runs.  ci: Hypothesis' own ci profile (derandomized, no
deadline, no example database), at the same size as dev.  deep: many more
examples, for the deep tox env.  Examples touch a real database, whose speed
varies, so no profile has a deadline.
"""

import os

from hypothesis import settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", settings.get_profile("ci"), max_examples=25)
settings.register_profile("deep", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

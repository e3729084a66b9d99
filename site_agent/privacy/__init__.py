"""What leaves a site: the privacy filters the site sets in ``local/site.yaml``.

:mod:`.policy` reads the site's filters and merges a request (app or task) into them,
the site's settings being the floor; :mod:`.apply` runs the filters on a result before it
is written for the server. One module per filter family: :mod:`.exclude`,
:mod:`.percentile`, :mod:`.svt`, :mod:`.gaussian`. See ``docs/privacy.md``.
"""

from .base import PrivacyConfigError
from .policy import FILTERS, PrivacyPolicy, effective_policy, parse_policy, tighten

__all__ = ["FILTERS", "PrivacyConfigError", "PrivacyPolicy", "effective_policy", "parse_policy", "tighten"]

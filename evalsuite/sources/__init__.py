"""Sources of images other than a diffusers pipeline, behind one interface (`Source`, whose generator makes
a batch of work units into a `Made`): a hosted image API (`hosted`: `--model openai:NAME`) and a folder
of images made elsewhere (`folder`: `--images PATH`). docs/sources.md says how to audit each and what
each can and cannot measure.
"""

from evalsuite.sources.base import (
    EXPOSABLE,
    Made,
    Source,
    UnitGenerator,
    Wanted,
    describe_source,
    one_scale_problem,
    pipeline_source,
)
from evalsuite.sources.folder import IMAGE_SUFFIXES, MANIFESTS, folder_name, folder_problems, folder_source
from evalsuite.sources.hosted import (
    DEFAULT_BASE,
    HOSTED_PREFIX,
    RECEIVED,
    REFUSAL_CODES,
    HostedGenerator,
    HostedOptions,
    flag,
    hosted_problems,
    hosted_source,
    is_hosted,
)

__all__ = [
    "DEFAULT_BASE", "EXPOSABLE", "HOSTED_PREFIX", "IMAGE_SUFFIXES", "MANIFESTS", "RECEIVED", "REFUSAL_CODES",
    "HostedGenerator", "HostedOptions", "Made", "Source", "UnitGenerator", "Wanted", "describe_source", "flag",
    "folder_name", "folder_problems", "folder_source", "hosted_problems", "hosted_source", "is_hosted",
    "one_scale_problem", "pipeline_source",
]

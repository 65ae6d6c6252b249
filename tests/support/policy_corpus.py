"""The policy-file corpus (tests/policies/): what each file in bad/ is refused for, and where.

``kind`` says who refuses a bad file besides ``mxgate policy validate`` (which refuses all of them):

- ``file``: the file itself (bytes, YAML, documents): also the controller, at start-up and on reload.
  kubectl reads YAML differently (it may take an alias, a duplicate key or a tag), so the API server is
  not asked.
- ``model``: one field's value; the API server refuses the object too (schema, pattern or CEL rule),
  naming the same field (tests/cluster/test_crd_cluster.py applies each file).
- ``kubectl``: a value JSON cannot carry (NaN, infinity, a 400-digit integer): kubectl itself refuses it.
- ``python``: what only Python can check (a regex that must compile): the API server stores it and the
  operator reports ``Ready=False / InvalidSpec``, keeping the last good version (crd.py says why).

``fragment`` is text every refusal of the file must contain; ``field`` the field path both the
validator and the API server must name (None for file-level refusals).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CORPUS = Path(__file__).resolve().parents[1] / "policies"
BAD = CORPUS / "bad"
GOOD = CORPUS / "good"


@dataclass(frozen=True)
class Refusal:
    kind: Literal["file", "model", "kubectl", "python"]
    fragment: str
    field: str | None = None


REFUSALS: dict[str, Refusal] = {
    # -- bytes, YAML and documents
    "not-utf8-latin1.yaml": Refusal("file", "line 7: not UTF-8 (byte 0xe9 at offset 204)"),
    "not-utf8-utf16.yaml": Refusal("file", "line 1: not UTF-8 (byte 0xff at offset 0)"),
    "nul-byte.yaml": Refusal("file", "line 7: character #x0000 is not allowed in YAML"),
    "malformed-unclosed-flow.yaml": Refusal("file", "not valid YAML: line 8, column 1: while parsing a flow mapping"),
    "malformed-tab-indent.yaml": Refusal("file", "not valid YAML: line 8, column 1: while scanning for the next token"),
    "malformed-bad-indent.yaml": Refusal("file", "not valid YAML: line 9, column 4: while parsing a block mapping"),
    "duplicate-key.yaml": Refusal("file", "line 8, column 3: found the key 'limits' twice in one mapping "
                                          "(first on line 7)"),
    "duplicate-key-nested.yaml": Refusal("file", "line 9, column 5: found the key 'maxConnections' twice"),
    "duplicate-key-metadata.yaml": Refusal("file", "line 6, column 3: found the key 'name' twice"),
    "alias-billion-laughs.yaml": Refusal("file", "line 7, column 8: found an anchor (&a): anchors and aliases are "
                                                 "not allowed in a policy file"),
    "alias-merge-key.yaml": Refusal("file", "found an anchor (&base)"),
    "tag-binary.yaml": Refusal("file", "found the tag !!binary: tags are not allowed in a policy file"),
    "tag-python.yaml": Refusal("file", "found the tag !!python/object:os.system"),
    "tag-timestamp.yaml": Refusal("file", "line 8, column 16: found the tag !!timestamp"),
    "deep-nesting.yaml": Refusal("file", "nested deeper than 32 levels"),
    "huge-int-5000-digits.yaml": Refusal("file", "line 7, column 28: cannot read this value: Exceeds the limit "
                                                 "(4300 digits) for integer string conversion"),
    "empty.yaml": Refusal("file", "no ProviderPolicy in the file"),
    "comments-only.yaml": Refusal("file", "no ProviderPolicy in the file"),
    "only-separators.yaml": Refusal("file", "no ProviderPolicy in the file"),
    "multi-document-list.yaml": Refusal("file", "[1]: expected a ProviderPolicy mapping, got list"),
    "multi-document-scalar.yaml": Refusal("file", "expected a ProviderPolicy mapping, got str"),
    "multi-document-same-name.yaml": Refusal("file", "[1]: policy 'corpus' is defined twice in the file"),
    "multi-document-second-bad.yaml": Refusal("file", "[1]: spec.retry.maxAge: '0s' is out of range"),
    "yaml-2-directive.yaml": Refusal("file", "found incompatible YAML document"),
    # -- durations
    "zero-throttled-delay.yaml": Refusal("model", "'0s' is out of range: must be from 100ms to 24h",
                                         "spec.retry.throttledDelay"),
    "zero-max-age.yaml": Refusal("model", "'0ms' is out of range: must be from 1s to 30d", "spec.retry.maxAge"),
    "huge-max-age-400-digits.yaml": Refusal("model", "not a duration: longer than 64 characters", "spec.retry.maxAge"),
    "huge-max-age-days.yaml": Refusal("model", "'400d' is out of range: must be from 1s to 30d", "spec.retry.maxAge"),
    "huge-delay.yaml": Refusal("model", "'2d' is out of range: must be from 100ms to 24h", "spec.retry.maxDelay"),
    "huge-duration-overflows-go.yaml": Refusal("model", "is out of range", "spec.retry.maxAge"),
    "tiny-delay.yaml": Refusal("model", "'99ms' is out of range: must be from 100ms to 24h",
                               "spec.retry.initialDelay"),
    "garbage-duration.yaml": Refusal("model", "'5 days' is not a duration", "spec.retry.maxAge"),
    "bare-number-duration.yaml": Refusal("model", "60 is a bare number: a duration needs a unit",
                                         "spec.retry.initialDelay"),
    "days-too-many-decimals.yaml": Refusal("model", "'1.123456789d' is not a duration", "spec.retry.maxAge"),
    "negative-duration.yaml": Refusal("model", "'-1m' is not a duration", "spec.retry.initialDelay"),
    "days-not-first.yaml": Refusal("model", "'12h1d' is not a duration", "spec.retry.maxAge"),
    "microsecond-sign.yaml": Refusal("model", "is not a duration", "spec.retry.initialDelay"),
    "evaluation-window-too-long.yaml": Refusal("model", "'1h' is out of range: must be from 1s to 10m",
                                               "spec.adaptive.evaluationWindow"),
    "evaluation-window-zero.yaml": Refusal("model", "'0s' is out of range", "spec.adaptive.evaluationWindow"),
    "suspend-zero.yaml": Refusal("model", "'0s' is out of range: must be from 1s to 24h", "spec.responses"),
    "suspend-too-long.yaml": Refusal("model", "'2d' is out of range: must be from 1s to 24h", "spec.responses"),
    "max-delay-below-initial.yaml": Refusal("model", "must not be shorter than initialDelay", "spec.retry.maxDelay"),
    "timeout-too-short.yaml": Refusal("model", "'500ms' is out of range: must be from 1s to 1h",
                                      "spec.timeouts.dataDone"),
    "timeout-too-long.yaml": Refusal("model", "'1d' is out of range: must be from 1s to 1h", "spec.timeouts.greeting"),
    # -- numbers and the rest of the model
    "zero-rate.yaml": Refusal("model", "greater than or equal to 0.01", "spec.limits.messagesPerSecond"),
    "tiny-rate.yaml": Refusal("model", "greater than or equal to 0.01", "spec.limits.messagesPerSecond"),
    "zero-burst.yaml": Refusal("model", "greater than or equal to 1", "spec.limits.burst"),
    "string-for-number.yaml": Refusal("model", "spec.limits.maxConnections", "spec.limits.maxConnections"),
    "unknown-field.yaml": Refusal("model", "maxConection", "spec.limits.maxConection"),
    "warmup-no-such-date.yaml": Refusal("model", "spec.warmup.startDate", "spec.warmup.startDate"),
    "warmup-volume-falls.yaml": Refusal("model", "a ramp goes up", "spec.warmup.schedule"),
    "nan-rate.yaml": Refusal("kubectl", "spec.limits.messagesPerSecond: Input should be a finite number"),
    "inf-idle-timeout.yaml": Refusal("kubectl", "spec.limits.idleTimeoutSeconds: Input should be a finite number"),
    "huge-messages-per-day.yaml": Refusal("kubectl", "spec.limits.messagesPerDay: Input should be less than or "
                                                     "equal to 1000000000"),
    "regex-too-deep.yaml": Refusal("python", "not a usable regular expression: groups nested deeper than 50"),
    "regex-invalid.yaml": Refusal("python", "not a valid regular expression"),
    "regex-repetition-overflow.yaml": Refusal("python", "not a valid regular expression: the repetition number "
                                                        "is too large"),
}


def bad_files() -> list[Path]:
    return sorted(BAD.iterdir())


def good_files() -> list[Path]:
    return sorted(GOOD.iterdir())

"""Generate the FineTuneJob CustomResourceDefinition from the typed spec and status models.

Why generated: the pydantic models are the one source of truth for the API; a hand-written schema drifts. This
module turns their JSON Schema into a *structural* OpenAPI v3 schema (no $ref, a type at every level, no
anyOf-of-types) and adds what only Kubernetes understands, keyed by field path: CEL rules, int-or-string
quantities, preserve-unknown-fields for embedded Kubernetes types, and bounds that keep CEL cost estimates low.

Encoding choices (documented in docs/operator.md, "API encoding choices"):
- Optional fields are not `nullable`: the API server drops an explicit `null`, which means "unset" to the model.
- spec.hyperparameters.learningRate accepts a number or a string ("2e-5"). A structural schema cannot say
  "number or string" (x-kubernetes-int-or-string rejects 2.0e-5), so the field carries no type
  (x-kubernetes-preserve-unknown-fields) with a `pattern` that applies to strings and min/max that apply to numbers;
  anything else is rejected by the operator as InvalidSpec naming the field.
- Quantities (cpusPerWorker, memoryPerWorker, head.cpu/memory) are x-kubernetes-int-or-string with the quantity
  pattern, like Kubernetes' own resource quantities.
- The spec is immutable once the operator has started the job (status.phase set and not Suspended), except
  `suspend` and `ttlSecondsAfterFinished`: a root transition rule compares oldSelf.spec with self.spec field by
  field. To change a running job: suspend it, edit, resume (a new attempt resumes from the checkpoint).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from finetune_trainer import spec as ftspec

from finetune_operator import names
from finetune_operator.status_model import Status

Schema = dict[str, Any]

CRD_NAME = f"{names.PLURAL}.{names.GROUP}"
MUTABLE_SPEC_FIELDS = ("suspend", "ttlSecondsAfterFinished")
MUTABLE_PHASES = ("", "Suspended")
STRING_MAX = 4096
# Go's RE2 accepts (?P<name>...) but the server prints the pattern in errors: keep it readable.
QUANTITY_PATTERN = re.sub(r"\?P<\w+>", "", ftspec.QUANTITY_PATTERN)
LIST_MAX = 64

# ---- per-path additions (paths in wire form, from the object root) ----
_URI_RULES: dict[str, tuple[tuple[str, ...], bool]] = {
    "spec.model.uri": (ftspec.MODEL_URI_SCHEMES, True),
    "spec.dataset.train": (ftspec.DATA_URI_SCHEMES, True),
    "spec.dataset.validation": (ftspec.DATA_URI_SCHEMES, True),
}
_QUANTITIES = {
    "spec.resources.cpusPerWorker",
    "spec.resources.memoryPerWorker",
    "spec.resources.head.cpu",
    "spec.resources.head.memory",
}
# No server-side default: the operator's settings may supply one, so "unset" must stay visible.
_NO_DEFAULT = {"spec.storage.region"}
_PRESERVE_OBJECTS = {
    "spec.resources.affinity": "Kubernetes Affinity object (core/v1), applied to every pod as is.",
    "spec.resources.tolerations[]": "Kubernetes Toleration object (core/v1).",
}
_EXTRA_RULES: dict[str, list[Schema]] = {
    "spec.model": [
        {
            "rule": "!has(self.revision) || self.uri.startsWith('hf://')",
            "message": "revision is only allowed with an hf:// model uri",
            "fieldPath": ".revision",
            "reason": "FieldValueForbidden",
        }
    ],
    "spec.method": [
        {
            "rule": f"!has(self.{field}) || self.strategy == '{strategy}'",
            "message": f"{field} is only allowed with strategy '{strategy}'",
            "fieldPath": f".{field}",
            "reason": "FieldValueForbidden",
        }
        for field, strategy in (("unfreezeLayers", "top-layers"), ("gradual", "gradual"), ("lora", "lora"))
    ],
    "spec": [
        {
            "rule": "!(self.task == 'causal-lm' && self.method.strategy == 'head')",
            "message": "strategy 'head' needs a new task head; causal-lm reuses the LM head (use lora or full)",
            "fieldPath": ".method.strategy",
            "reason": "FieldValueInvalid",
        }
    ],
}
# On a cluster several pods write checkpoints and artifacts: only shared object storage works. `finetune run` (no
# cluster, no CRD) keeps accepting file:// and local paths through the spec model.
_CLUSTER_OUTPUT_RULE = {
    "rule": "self.startsWith('s3://') && !self.endsWith('://')",
    "message": "a cluster job needs shared object storage: spec.output.uri must be s3://bucket/prefix/ (file:// and "
    "local paths are written inside one pod and lost with it; they work with `finetune run` only)",
    "reason": "FieldValueInvalid",
}
_QUANTITY_POSITIVE = {
    "rule": "type(self) == int ? self > 0 : !self.matches('^0+(\\\\.0+)?[a-zA-Z]*$')",
    "message": "must be greater than zero",
}


def _uri_rule(schemes: tuple[str, ...], *, local_path: bool) -> Schema:
    allowed = " || ".join(f"self.startsWith('{s}')" for s in schemes)
    rule = f"({allowed}) && !self.endsWith('://')"
    if local_path:
        rule = f"({rule}) || !self.contains('://')"
    where = ", ".join(schemes) + (" or a local path" if local_path else "")
    return {"rule": rule, "message": f"unsupported URI scheme; allowed: {where}", "reason": "FieldValueInvalid"}


class _Converter:
    def __init__(self, defs: dict[str, Schema]) -> None:
        self.defs = defs

    def _deref(self, node: Schema) -> Schema:
        while "$ref" in node:
            target = self.defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {k: v for k, v in node.items() if k != "$ref"}
            node = {**target, **merged}
        return node

    def _strip_null(self, node: Schema) -> Schema:
        variants = node.get("anyOf")
        if not variants:
            return node
        rest = [v for v in variants if v.get("type") != "null"]
        if len(rest) != 1:
            raise ValueError(f"cannot express anyOf {variants} structurally")
        merged = {k: v for k, v in node.items() if k != "anyOf"}
        return {**self._deref(rest[0]), **merged}

    def convert(self, node: Schema, path: str) -> Schema:
        node = self._strip_null(self._deref(node))
        out: Schema = {}
        if "description" in node:
            out["description"] = node["description"]
        if path == "spec.hyperparameters.learningRate":
            return self._learning_rate(node, out)
        if path in _QUANTITIES:
            out.update({"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN})
            out["x-kubernetes-validations"] = [dict(_QUANTITY_POSITIVE)]
            if "default" in node:
                out["default"] = node["default"]
            return out
        if path in _PRESERVE_OBJECTS:
            out.setdefault("description", _PRESERVE_OBJECTS[path])
            out.update({"type": "object", "x-kubernetes-preserve-unknown-fields": True})
            return out
        kind = node.get("type")
        if kind == "object":
            self._object(node, out=out, path=path)
        elif kind == "array":
            out["type"] = "array"
            out["items"] = self.convert(node.get("items", {}), f"{path}[]")
            out["maxItems"] = node.get("maxItems", LIST_MAX)
            if "minItems" in node:
                out["minItems"] = node["minItems"]
        elif kind in {"string", "integer", "number", "boolean"}:
            out["type"] = kind
            self._scalar(node, out)
        else:
            raise ValueError(f"{path}: unsupported schema {node}")
        if "default" in node and node["default"] is not None and path not in _NO_DEFAULT:
            out["default"] = node["default"]
        rules = list(_EXTRA_RULES.get(path, []))
        if path in _URI_RULES:
            schemes, local = _URI_RULES[path]
            rules.append(_uri_rule(schemes, local_path=local))
        if path == "spec.output.uri":
            rules.append(dict(_CLUSTER_OUTPUT_RULE))
        if rules:
            out["x-kubernetes-validations"] = out.get("x-kubernetes-validations", []) + rules
        return out

    def _object(self, node: Schema, *, out: Schema, path: str) -> None:
        out["type"] = "object"
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {key: self.convert(value, f"{path}.{key}") for key, value in props.items()}
            required = [key for key in node.get("required", []) if key in props]
            if required:
                out["required"] = required
            # Objects with defaulted members default to {} so the server fills their defaults in.
            for key, value in props.items():
                child = self._strip_null(self._deref(value))
                if child.get("type") == "object" and key not in required and "default" not in out["properties"][key]:
                    nested_defaults = any("default" in p for p in out["properties"][key].get("properties", {}).values())
                    if nested_defaults and "anyOf" not in value:
                        out["properties"][key]["default"] = {}
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = self.convert(extra, f"{path}{{}}")
            out["maxProperties"] = LIST_MAX
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True

    @staticmethod
    def _scalar(node: Schema, out: Schema) -> None:
        for key in ("enum", "pattern", "minLength", "maxLength", "minimum", "maximum", "format"):
            if key in node:
                out[key] = node[key]
        if "const" in node:
            out["enum"] = [node["const"]]
        # JSON Schema 2020 numeric exclusive bounds -> OpenAPI v3.0 boolean form.
        if "exclusiveMinimum" in node:
            out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
        if "exclusiveMaximum" in node:
            out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True
        if out.get("type") == "string" and "maxLength" not in out and "enum" not in out:
            out["maxLength"] = STRING_MAX

    @staticmethod
    def _learning_rate(node: Schema, out: Schema) -> Schema:
        out["description"] = (
            node.get("description", "") + " Encoded without a type so both forms are accepted; strings must be a "
            "decimal or scientific number, numbers must be in (0, 1]."
        ).strip()
        out["x-kubernetes-preserve-unknown-fields"] = True
        out["pattern"] = r"^\s*[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?\s*$"
        out["minimum"] = node.get("exclusiveMinimum", 0)
        out["exclusiveMinimum"] = True
        out["maximum"] = node.get("maximum", 1)
        if "default" in node:
            out["default"] = node["default"]
        return out


def spec_schema() -> Schema:
    raw = ftspec.FineTuneJobSpec.model_json_schema(by_alias=True, mode="validation")
    return _Converter(raw.get("$defs", {})).convert(raw, "spec")


def status_schema() -> Schema:
    raw = Status.model_json_schema(by_alias=True, mode="serialization")
    schema = _Converter(raw.get("$defs", {})).convert(raw, "status")
    schema["description"] = "Observed state, written by the operator only."
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["items"]["properties"]["lastTransitionTime"]["format"] = "date-time"
    for key in ("startTime", "completionTime", "attemptStartTime"):
        schema["properties"][key]["format"] = "date-time"
    return schema


def immutability_rule(spec: Schema) -> Schema:
    """Root transition rule: once started, only suspend / ttlSecondsAfterFinished may change."""
    checks = []
    for key in spec["properties"]:
        if key in MUTABLE_SPEC_FIELDS:
            continue
        if key in spec.get("required", []) or "default" in spec["properties"][key]:
            checks.append(f"self.spec.{key} == oldSelf.spec.{key}")
        else:
            checks.append(
                f"(has(self.spec.{key}) == has(oldSelf.spec.{key}) && "
                f"(!has(self.spec.{key}) || self.spec.{key} == oldSelf.spec.{key}))"
            )
    phases = ", ".join(f"'{p}'" for p in MUTABLE_PHASES)
    started = f"has(oldSelf.status) && has(oldSelf.status.phase) && !(oldSelf.status.phase in [{phases}])"
    return {
        "rule": f"!({started}) || ({' && '.join(checks)})",
        "message": "spec is immutable once the job has started, except suspend and ttlSecondsAfterFinished; "
        "suspend the job, edit it, then resume (training continues from the checkpoint)",
        "fieldPath": ".spec",
        "reason": "FieldValueForbidden",
    }


def build_crd() -> Schema:
    """The complete apiextensions.k8s.io/v1 CustomResourceDefinition."""
    spec = spec_schema()
    spec["description"] = "Desired fine-tuning run: model, data, adaptation method, resources and lifecycle."
    root: Schema = {
        "type": "object",
        "description": "FineTuneJob adapts a pretrained model to a data set on a Ray Train cluster.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": names.GROUP_VERSION},
            "kind": {"type": "string", "description": "FineTuneJob"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema(),
        },
        # No rule on metadata.name: the API server accepts any DNS subdomain and every one of them works (child
        # names are shortened with a hash, names.child_base).
        "x-kubernetes-validations": [
            immutability_rule(spec),
        ],
    }
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Job phase"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary", "description": "Steps done"},
        {
            "name": "Metric",
            "type": "number",
            "jsonPath": ".status.progress.evalMetric",
            "description": "Watched evaluation metric (earlyStopping.metric, else the task default)",
        },
        {"name": "Workers", "type": "string", "jsonPath": ".status.cluster.ready", "description": "Ready workers"},
        {"name": "Queue", "type": "string", "jsonPath": ".status.queue.name", "description": "Kueue LocalQueue"},
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
        {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/part-of": "finetune-operator"},
        },
        "spec": {
            "group": names.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": names.KIND,
                "listKind": f"{names.KIND}List",
                "plural": names.PLURAL,
                "singular": names.KIND.lower(),
                "shortNames": [ftspec.SHORT_NAME],
                "categories": ["all", "finetune", "ml"],
            },
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": copy.deepcopy(root)},
                }
            ],
        },
    }

"""The local torch runner as a gateway backend: v2 metadata, ready and infer.

``start`` reads the artifact (decrypt, verify, load), warms the model up and
starts the batching worker. A model that cannot be loaded safely is never
served: start-up fails naming the model and the reason, or, with
``start_degraded``, the gateway runs without it (``ready`` false, infer 503).
torch is imported only here in ``start``, so loading a config never pays for
(or needs) torch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import orjson

from gateway.backend import Backend, BackendEnv
from gateway.config import TensorSpec
from gateway.errors import ConfigError, InvalidRequest, NotFound, Unavailable
from gateway.pipeline import BackendResponse, RequestContext, RouteKind
from gateway.v2 import check_infer_request
from gateway.v2_binary import HEADER as BINARY_HEADER
from gateway.v2_binary import encode_answer, wants_binary
from gateway.v2_routes import version_of

from .config import TorchBackendConfig, findings, verifies_signatures

if TYPE_CHECKING:
    from gateway.config import ModelConfig
    from gateway.findings import Finding

    from .loader import LoadedModel
    from .runner import BatchRunner

log = logging.getLogger("maas.torch")

# what an input of each datatype is fed to torch as (BF16, which numpy lacks: float32, narrowed in _forward)
_NP_DTYPES: dict[str, Any] = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16,
                              "INT32": np.int32, "INT64": np.int64, "FP16": np.float16, "BF16": np.float32,
                              "FP32": np.float32, "FP64": np.float64}
MAX_REQUEST_SAMPLES = 4096  # one request's batch dimension; the body size limit bounds it too


def default_threads() -> int:
    """Half the cores, at most 4: the event loop (JSON, auth, policy) needs the other half, and
    intra-op parallelism stops paying off for small batches well before 4 threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


class TorchBackend(Backend):
    config_class = TorchBackendConfig
    config: TorchBackendConfig

    def __init__(self, name: str, model: ModelConfig, config: Any, env: BackendEnv) -> None:
        super().__init__(name, model, config, env)
        self._runner: BatchRunner | None = None
        self._loaded: LoadedModel | None = None
        self._failure: str | None = None
        self._input_shape: tuple[int, ...] = ()
        self._any_rank = False
        self._declared: list[TensorSpec] | None = None  # set once the model is loaded; read per request
        self._output_shape: tuple[int, ...] = ()
        self._output_datatype = "FP32"
        self._metadata_body = b""
        self.info: dict[str, Any] = {}  # what was loaded: format, encrypted, signed, sha256, device

    def protocol(self) -> str:
        return "v2"

    # -- asked of the class: by `maas-gateway check` and the CLI --------------------

    @classmethod
    def config_findings(cls, name: str, config: Any) -> list[Finding]:
        return findings(name, config)

    @classmethod
    def data_path(cls, config: Any) -> Path | None:
        return Path(config.path)

    @classmethod
    def verifies_signatures(cls, config: Any) -> bool:
        return verifies_signatures(config)

    @classmethod
    def add_commands(cls, subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        from . import cli, demo

        cli.register(subparsers)
        demo.register(subparsers)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._load)
        except _Refused as exc:
            reason = str(exc)
            if not self.config.start_degraded:
                raise ConfigError(f"model {self.name}: {reason}") from None
            self._failure = reason
            log.error("model %s is not served (start_degraded): %s", self.name, reason)
            return
        from .runner import BatchRunner

        cfg = self.config
        runner = BatchRunner(self._forward, name=self.name, max_batch_size=cfg.max_batch_size,
                             max_batch_delay_s=cfg.max_batch_delay_ms / 1000.0, max_queue=cfg.max_queue,
                             metrics=self.env.metrics)
        await runner.start()
        try:  # warm-up in the worker thread itself: first-call allocations and kernel choice happen now
            if not self._dynamic():  # with -1 dimensions there is no shape to warm up with
                warm = np.zeros((cfg.max_batch_size, *self._input_shape), self._input_dtype())
                await asyncio.to_thread(runner.run_sync, [warm])
        except Exception as exc:
            await runner.close(0)
            raise ConfigError(f"model {self.name}: warm-up failed: {exc}") from None
        self._runner = runner
        log.info("model %s: %s loaded (%s%s), device %s, batch <= %d, %d thread(s)", self.name,
                 self.info["format"], "encrypted, " if self.info["encrypted"] else "",
                 "signature verified" if self.info["signed"] else "unsigned", self.info["device"],
                 cfg.max_batch_size, self.info["threads"])

    def _load(self) -> None:
        """Everything slow and blocking: runs in a thread so start-up of other parts is not frozen."""
        import torch

        from .loader import ModelLoadError, OmsTrust, load_key, load_module, load_verify_key, read_verified

        cfg = self.config
        threads = cfg.threads or default_threads()
        torch.set_num_threads(threads)
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise _Refused("device: cuda is configured but CUDA is not available")
        try:
            key = load_key(key_env=cfg.key_env, key_file=cfg.key_file)
            verify_key = load_verify_key(cfg.verify_key_file)
            oms = OmsTrust(cfg.oms_signature, cfg.oms_public_key, cfg.oms_certificate) if cfg.oms_signature else None
            verified = read_verified(cfg.path, key=key, verify_key=verify_key, min_version=cfg.min_version, oms=oms)
            loaded = load_module(verified.data, arch=cfg.arch, device=device, allow_torchscript=cfg.allow_torchscript)
        except ModelLoadError as exc:
            raise _Refused(str(exc)) from None
        self.info = {"format": loaded.format, "encrypted": verified.encrypted, "signed": verified.signed,
                     "sha256": verified.sha256, "device": device, "threads": threads,
                     "model_version": verified.model_version, "oms": verified.oms_name is not None}
        del verified
        self._loaded = loaded
        shape = cfg.input_shape or self._declared_input_shape() or loaded.input_shape
        if not shape and loaded.format != "torchscript":
            raise _Refused("input_shape is unknown: set input_shape in the backend config")
        self._any_rank = not shape  # TorchScript that declares no shape: samples of any shape (-1 dimensions)
        self._input_shape = tuple(shape or (-1,))
        if self._dynamic():  # nothing to test-run with: each request's shape is the model's business
            self._output_shape = tuple(cfg.output_shape or loaded.output_shape or (-1,))
            self._metadata_body = orjson.dumps(self._metadata())
            return
        self._declared = [TensorSpec(cfg.input_name, cfg.input_datatype, [-1, *self._input_shape])]
        try:
            probe = self._forward([np.zeros((1, *self._input_shape), self._input_dtype())])
        except Exception as exc:  # e.g. a TorchScript model that wants another input_shape
            raise _Refused(f"test run with input shape [1, {', '.join(map(str, self._input_shape))}] failed: "
                           f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}") from None
        self._output_shape = tuple(cfg.output_shape or probe.shape[1:])
        if tuple(probe.shape[1:]) != self._output_shape:
            raise _Refused(f"output_shape {list(self._output_shape)} does not match the model's {list(probe.shape[1:])}")
        self._metadata_body = orjson.dumps(self._metadata())  # (_forward set the output's datatype)

    def _declared_input_shape(self) -> tuple[int, ...] | None:
        for spec in self.model.inputs or ():
            if spec.name == self.config.input_name and len(spec.shape) >= 2:
                return tuple(spec.shape[1:])
        return None

    def _input_dtype(self) -> Any:
        return _NP_DTYPES[self.config.input_datatype]

    def _dynamic(self) -> bool:
        """Whether the sample shape has -1 dimensions (or an unknown rank): no warm-up, batches by shape."""
        return self._any_rank or -1 in self._input_shape

    def _shape_fits(self, shape: list[int]) -> bool:
        """Whether a request's ``[n, ...]`` shape fits the sample shape (-1: any size; unknown rank: any rank)."""
        if self._any_rank:
            return 1 <= len(shape) <= 9 and all(d >= 1 for d in shape[1:])
        return len(shape) == len(self._input_shape) + 1 and all(
            d == e or (e == -1 and d >= 1) for d, e in zip(shape[1:], self._input_shape))

    def _forward_each(self, inputs: list[np.ndarray]) -> np.ndarray:
        """A batch of differing sample shapes, one request at a time; outputs stacked when their shapes agree."""
        outs = [self._forward([x]) for x in inputs]
        if len({o.shape[1:] for o in outs}) == 1:
            return np.concatenate(outs)
        rows = np.empty(sum(len(o) for o in outs), dtype=object)  # one sample's output per row; see _infer
        rows[:] = [sample for o in outs for sample in o]
        return rows

    def _forward(self, inputs: list[np.ndarray]) -> np.ndarray:
        """One forward pass over a whole batch; runs in the worker thread."""
        import torch

        loaded = self._loaded
        assert loaded is not None
        if len(inputs) > 1 and self._dynamic() and len({x.shape[1:] for x in inputs}) > 1:
            return self._forward_each(inputs)
        x = np.concatenate(inputs) if len(inputs) > 1 else inputs[0]
        tensor = torch.from_numpy(x)
        if self.config.input_datatype == "BF16":
            tensor = tensor.to(torch.bfloat16)
        if loaded.device != "cpu":
            tensor = tensor.to(loaded.device, non_blocking=True)
        with torch.inference_mode():
            out = loaded.module(tensor)
        if isinstance(out, (tuple, list)):
            out = out[0]
        # the output keeps its datatype (a BF16 model answers BF16); one v2 has no name for is widened
        datatype = _V2_OF_TORCH.get(str(out.dtype).removeprefix("torch."))
        if datatype is None:
            datatype = "FP32" if out.is_floating_point() else "INT64"
            out = out.float() if out.is_floating_point() else out.long()
        elif datatype == "BF16":
            out = out.float()  # numpy has no bfloat16: float32 values, encoded as BF16 on the wire
        self._output_datatype = datatype  # a test run at load sets it; a -1-dimension model's answers tell
        return out.cpu().numpy()

    def ready(self) -> bool:
        return self._runner is not None

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.close(self.env.server.shutdown_timeout_s)

    def stats(self) -> dict[str, Any]:
        return self._runner.stats() if self._runner is not None else {}

    def declared_inputs(self) -> list[TensorSpec] | None:
        """The input the loaded model takes, for the validate stage (None until loaded)."""
        return self._declared

    # -- requests ------------------------------------------------------------------

    async def handle(self, ctx: RequestContext) -> BackendResponse:
        kind = ctx.route.kind if ctx.route else None
        version = version_of(ctx.path)
        if version is not None and version != str(self.config.version):
            raise NotFound(f"model {self.name} has no version {version[:20]!r} (it serves {self.config.version})")
        if kind is RouteKind.V2_INFER:
            return await self._infer(ctx)
        if kind is RouteKind.V2_READY:
            ready = self.ready()
            return _json(200 if ready else 503, {"name": self.name, "ready": ready})
        if kind is RouteKind.V2_METADATA:
            if not self._metadata_body:
                raise Unavailable(f"model {self.name} is not available")
            return BackendResponse(200, body=self._metadata_body)
        raise NotFound("route not served by this model")

    def _metadata(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "name": self.name,
            "versions": [cfg.version],
            "platform": f"pytorch_{self.info.get('format', 'unknown')}",
            "inputs": [{"name": cfg.input_name, "datatype": cfg.input_datatype, "shape": [-1, *self._input_shape]}],
            "outputs": [{"name": cfg.output_name, "datatype": self._output_datatype,
                         "shape": [-1, *self._output_shape]}],
        }

    async def _infer(self, ctx: RequestContext) -> BackendResponse:
        runner = self._runner
        if runner is None:
            raise Unavailable(f"model {self.name} is not available")
        payload = ctx.json
        if payload is None and ctx.body:
            try:
                payload = orjson.loads(ctx.body)
            except orjson.JSONDecodeError:
                raise InvalidRequest("body is not valid JSON") from None
        # the validate stage's converted inputs describe ctx.json: a body parsed here has none
        inputs = self._parse(payload, ctx.validated_inputs if payload is ctx.json else None)
        outputs = await runner.infer(inputs)
        if outputs.dtype == object:  # a mixed-shape batch of a -1-dimension model: this request's rows
            outputs = np.stack(list(outputs))
        cfg = self.config
        flat = outputs.reshape(-1)
        tensor = {"name": cfg.output_name, "datatype": self._output_datatype, "shape": list(outputs.shape)}
        answer: dict[str, Any] = {"model_name": self.name, "model_version": cfg.version}
        request_id = payload.get("id")
        if isinstance(request_id, str):
            answer["id"] = request_id
        # body: numpy serialised by orjson (float32 printed at float32 precision); json: plain lists for harden
        answer["outputs"] = [{**tensor, "data": flat}]
        if wants_binary(payload, cfg.output_name):  # tritonclient's default: raw bytes after a JSON header
            body, header = encode_answer(answer, lambda _out: True)
            answer["outputs"] = [{**tensor, "data": flat.tolist()}]
            return BackendResponse(200, [(BINARY_HEADER, str(header))], body=body, json=answer,
                                   content_type="application/octet-stream")
        body = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
        answer["outputs"] = [{**tensor, "data": flat.tolist()}]
        return BackendResponse(200, body=body, json=answer)

    def _parse(self, payload: Any, checked: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """The request's single input tensor as an array of shape (n, *input_shape); 400 on any mismatch.

        What this model takes (one input, its name, a number datatype, its shape, at most
        ``MAX_REQUEST_SAMPLES`` rows) is checked here; whether the values are valid v2
        data (types, ranges, count, rectangular nesting) is ``gateway.v2``'s one check.
        ``checked`` holds what the validate stage made of this very document (the
        float inputs converted, in range, as many values as the shape needs); None
        means the stage did not see it, so the same check runs here.
        """
        cfg = self.config
        if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
            raise InvalidRequest("body must be a v2 inference request with an 'inputs' list")
        tensors = payload["inputs"]
        if len(tensors) != 1 or not isinstance(tensors[0], dict):
            raise InvalidRequest(f"model {self.name} takes exactly one input tensor, {cfg.input_name!r}")
        t = tensors[0]
        if t.get("name") != cfg.input_name:
            raise InvalidRequest(f"unknown input {t.get('name')!r}; model {self.name} takes {cfg.input_name!r}")
        datatype = t.get("datatype")
        if datatype not in _NP_DTYPES:  # BYTES among them: a torch model takes numbers
            raise InvalidRequest(f"input {cfg.input_name!r}: datatype must be {cfg.input_datatype} (a torch model "
                                 f"takes numbers), got {datatype!r}")
        shape = t.get("shape")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
                or not self._shape_fits(shape) or not 1 <= shape[0] <= MAX_REQUEST_SAMPLES):
            dims = "..." if self._any_rank else ", ".join(map(str, self._input_shape))
            raise InvalidRequest(f"input {cfg.input_name!r}: shape must be [n, {dims}]"
                                 f" with 1 <= n <= {MAX_REQUEST_SAMPLES}, got {shape!r}")
        requested = payload.get("outputs")
        if isinstance(requested, list):
            for out in requested:
                if not isinstance(out, dict) or out.get("name") != cfg.output_name:
                    raise InvalidRequest(f"unknown output requested; model {self.name} has {cfg.output_name!r}")
        if checked is None:
            checked = {}
            check_infer_request(payload, None, checked)  # RequestViolation: a 400 naming the bad value
        # FP32 JSON data as converted by the validate stage, or binary data as decoded there (either dtype)
        ready = checked.get(cfg.input_name) if datatype == cfg.input_datatype else None
        if ready is not None and ready.size == math.prod(shape):
            return ready.reshape(shape).astype(self._input_dtype())  # a copy: binary data is the read-only body
        if "data" not in t:
            raise InvalidRequest(f"input {cfg.input_name!r}: no data")
        # valid v2 data by now: numbers of the datatype, within its range, rectangular, as many as the shape
        array = np.asarray(t["data"])
        with np.errstate(over="ignore", invalid="ignore"):
            return array.reshape(shape).astype(self._input_dtype(), copy=False)


_V2_OF_TORCH = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int16": "INT16", "int32": "INT32",
                "int64": "INT64", "float16": "FP16", "bfloat16": "BF16", "float32": "FP32", "float64": "FP64"}


class _Refused(Exception):
    """Internal: the model must not be served, for the reason in ``str()``."""


def _json(status: int, doc: dict[str, Any]) -> BackendResponse:
    return BackendResponse(status, body=orjson.dumps(doc), json=doc)

"""The Ray Serve deployment: one model per replica, concurrent requests batched with ``@serve.batch``.

Routes: ``POST /predict`` (image bytes or multipart ``image``; ``?overlay=1`` adds the overlay PNG in base64),
``GET /health``, ``GET /metadata`` (model, task, batching settings and the batch sizes this replica has run).
Bad requests get 4xx with ``{"error": "one line"}``; no request can crash a replica.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from ray import serve

from .request import BadRequest, check_declared_length, check_raw_type, decode_image, split_content_type


@dataclass(frozen=True)
class ModelSpec:
    """What a replica loads: exactly one of checkpoint / onnx / engine (a TensorRT engine)."""

    checkpoint: str | None = None
    onnx: str | None = None
    engine: str | None = None
    config: str | None = None  # config JSON for an ONNX graph / engine without a manifest
    device: str = "cpu"
    threads: int | None = None


def load_predictor(spec: ModelSpec):
    """An m2f.evaluation Predictor for ``spec`` (the same network call `m2f eval` makes)."""
    from m2f.evaluation.evaluate import RunnerPredictor, TorchPredictor

    if spec.engine is not None:
        from .engine import EnginePredictor

        return EnginePredictor(spec.engine, spec.config)
    if spec.onnx is not None:
        from m2f.cli.exported import exported_config
        from m2f.export.runner import open_runner

        return RunnerPredictor(open_runner(spec.onnx, threads=spec.threads), exported_config(spec.onnx, spec.config))
    import m2f

    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    model = m2f.from_pretrained(spec.checkpoint, device=spec.device)
    return TorchPredictor(model, model.config, name=spec.checkpoint, device=spec.device)


def run_network(predictor, pixel_values):
    """(the network's input, pred_logits, pred_masks) for a batch of any size, on a predictor that may take one
    input size only (padded up to it) and one batch size (ONNX ``fixed_batch``: chunks padded with zero images) or
    at most ``max_batch`` images (an engine's optimisation profile: chunks)."""
    import torch

    from m2f.export.runner import pad_to

    if predictor.fixed_size is not None:
        pixel_values = pad_to(pixel_values, predictor.fixed_size)
    fixed = predictor.fixed_batch
    step = fixed or getattr(predictor, "max_batch", None) or len(pixel_values)
    logits, masks = [], []
    for start in range(0, len(pixel_values), step):
        chunk = pixel_values[start:start + step]
        count = len(chunk)
        if fixed and count < fixed:
            chunk = torch.cat([chunk, chunk.new_zeros((fixed - count, *chunk.shape[1:]))])
        chunk_logits, chunk_masks = predictor(chunk)
        logits.append(chunk_logits[:count])
        masks.append(chunk_masks[:count])
    return pixel_values, torch.cat(logits), torch.cat(masks)


def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


@serve.deployment
class Segmenter:
    def __init__(self, spec: dict, max_batch: int, batch_wait_ms: float, task: str | None = None):
        from m2f.labels import labels_for_config

        self.spec = ModelSpec(**spec)
        self.predictor = load_predictor(self.spec)
        self.config = self.predictor.config
        self.task = task or self.config.default_task
        self.labels = labels_for_config(self.config)
        self.max_batch, self.batch_wait_ms = max_batch, batch_wait_ms
        self.run_batch.set_max_batch_size(max_batch)
        self.run_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)
        self.batch_sizes: Counter[int] = Counter()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_batch(self, images: list) -> list[tuple[Any, int]]:
        """Images of one padded size at a time (the network takes one size per call), resized to the model's
        test size as `m2f predict` does; (result, size of the batch it came in) each."""
        from m2f.preprocess import padded_shape, preprocess, resized_shape

        from .encode import postprocess_batch

        self.batch_sizes[len(images)] += 1
        shortest, max_size = self.config.test_size
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            size = resized_shape(image.shape[0], image.shape[1], shortest, max_size)
            groups.setdefault(padded_shape([size], self.config.size_divisibility), []).append(i)
        results: list[Any] = [None] * len(images)
        for indices in groups.values():
            batch = preprocess([images[i] for i in indices], self.config, resize_shortest=shortest,
                               max_size=max_size)
            pixel_values, logits, masks = run_network(self.predictor, batch.pixel_values)
            results_of_group = postprocess_batch(self.task, self.config, logits, masks, batch,
                                                 tuple(pixel_values.shape[-2:]))
            for i, result in zip(indices, results_of_group):
                results[i] = (result, len(images))
        return results

    def metadata(self) -> dict:
        return {"model": self.config.name, "task": self.task, "num_classes": self.config.num_classes,
                "names": list(self.labels.names), "source": {k: v for k, v in asdict(self.spec).items() if v},
                "max_batch": self.max_batch, "batch_wait_ms": self.batch_wait_ms,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}

    async def __call__(self, request) -> Any:
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/") or "/"
        if path == "/health" and request.method == "GET":
            return JSONResponse({"status": "ok"})
        if path == "/metadata" and request.method == "GET":
            return JSONResponse(self.metadata())
        if path != "/predict":
            return _error(404, f"no route {request.method} {path}; use POST /predict, GET /health or GET /metadata")
        if request.method != "POST":
            return _error(405, f"{request.method} /predict is not allowed; POST the image")
        try:
            image = decode_image(await self._upload(request))
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        from .encode import overlay_png, segments_json

        result, batch_size = await self.run_batch(image)
        body = {"task": self.task, "height": int(image.shape[0]), "width": int(image.shape[1]),
                "segments": segments_json(self.task, result, self.labels)}
        if request.query_params.get("overlay", "0").lower() in ("1", "true", "yes"):
            body["overlay_png"] = overlay_png(self.task, image, result, self.labels)
        return JSONResponse(body, headers={"X-Batch-Size": str(batch_size)})

    @staticmethod
    async def _upload(request) -> bytes:
        from starlette.formparsers import MultiPartException
        from starlette.requests import ClientDisconnect

        check_declared_length(request.headers.get("content-length"))
        kind = split_content_type(request.headers.get("content-type"))
        try:
            if kind == "multipart/form-data":
                try:
                    form = await request.form()
                except (MultiPartException, ValueError):
                    raise BadRequest(400, "the multipart body is malformed or truncated; send the whole form") from None
                upload = form.get("image")
                if upload is None or isinstance(upload, str):
                    raise BadRequest(400, "the multipart form has no file field 'image'; send the image as 'image'")
                return await upload.read()
            check_raw_type(kind)
            return await request.body()
        except ClientDisconnect:
            raise BadRequest(400, "the upload ended before its declared length (truncated); send the whole file") \
                from None


def build_app(spec: ModelSpec, replicas: int = 1, max_batch: int = 8, batch_wait_ms: float = 10.0,
              task: str | None = None, gpus_per_replica: float | None = None):
    """The bound application ``serve.run`` starts (one model per replica, one CPU each). An engine's replicas
    ask for a GPU each by default: Ray hides every GPU from an actor that asks for none."""
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if spec.engine is not None else 0.0
    options = {"num_cpus": 1, "num_gpus": gpus_per_replica}
    return Segmenter.options(num_replicas=replicas, ray_actor_options=options).bind(
        asdict(spec), max_batch, batch_wait_ms, task)

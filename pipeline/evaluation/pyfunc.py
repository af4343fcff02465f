"""The MLflow pyfunc of a trained BFN: ``predict`` draws samples (image arrays or decoded text).

Only MLflow imports this module: it is logged from code (``pyfunc_code.py``, no pickle), and at load
``load_context`` rebuilds the network from the resolved config (``config.json``) and reads the EMA
weights weights-only (``weights.pt``); text models carry their vocabulary (``tokenizer.json``).
Logging and registering happen in ``models``.

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    images = model.predict(None, params={"num_samples": 16, "sampler": "ode2", "nfe": 20, "seed": 0})

Params (``PARAMS``): ``num_samples``, ``sampler`` (paper, ode1, ode2, sde1, sde2), ``nfe`` (network
calls), ``seed``, ``grid`` (the BFN-Solvers' time grid; "" = the flow's default). Class-conditional
models (``model.num_labels``) add ``class`` (a class id; -1 = no label, the unconditional model) and
``guidance`` (the classifier-free guidance scale w; needs a class). Unconditional models' signatures
leave them out.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from bfn.samplers import sample as draw
from pipeline.config import Config, ConfigError, check_count, parse_grid, parse_guidance, parse_samplers
from pipeline.core import checkpointing
from pipeline.core.build import build_model
from pipeline.data.bpe import Vocabulary
from pipeline.evaluation.figures import to_uint8_images

PARAMS = {"num_samples": 16, "sampler": "paper", "nfe": 101, "seed": 0, "grid": ""}
CONDITIONAL_PARAMS = {"class": -1, "guidance": 0.0}  # class-conditional models only; -1: no label
ARTIFACTS = ("weights", "config", "tokenizer")  # artifact names; tokenizer for text models only


def signature(cfg: Config) -> ModelSignature:
    """No inputs (``predict(None, params=...)``); outputs (N, H, W, C) uint8 images or one string per sample."""
    if cfg.data.seq_len is not None:  # text
        outputs = Schema([ColSpec("string")])
    else:
        outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, *cfg.data.data_shape))])
    dtypes = {int: "long", str: "string", float: "double"}
    names = {**PARAMS, **(CONDITIONAL_PARAMS if cfg.model.num_labels is not None else {})}
    params = ParamSchema([ParamSpec(name, dtypes[type(value)], value) for name, value in names.items()])
    return ModelSignature(inputs=None, outputs=outputs, params=params)


class BFNSampler(mlflow.pyfunc.PythonModel):
    """A BFN's sampler behind MLflow's pyfunc interface; built in ``load_context``, never pickled."""

    def load_context(self, context) -> None:
        config = json.loads(Path(context.artifacts["config"]).read_text())
        self.cfg = Config.from_dict(config)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        weights = checkpointing.load_tensors(context.artifacts["weights"], self.device)  # weights_only=True
        self.model = build_model(self.cfg).to(self.device)
        self.model.load_state_dict(weights)
        self.model.eval()
        tokenizer = context.artifacts.get("tokenizer")
        self.vocab = None
        if tokenizer:  # text8: {"vocab": its 27 chars}; subword text: the Hugging Face tokenizer file
            text = Path(tokenizer).read_text()
            self.vocab = Vocabulary(text).pieces if self.cfg.data.name == "text_bpe" else json.loads(text)["vocab"]

    @torch.no_grad()
    def predict(self, context, model_input, params: dict | None = None):
        """Samples drawn with ``params`` (``PARAMS``, and ``CONDITIONAL_PARAMS`` for a conditional
        model); ``model_input`` is ignored."""
        conditional = self.cfg.model.num_labels is not None
        p = {**PARAMS, **(CONDITIONAL_PARAMS if conditional else {}), **(params or {})}
        num = check_count("num_samples", p["num_samples"], 1)
        nfe = check_count("nfe", p["nfe"], 1)
        sampler = parse_samplers(p["sampler"], "sampler", several=False)[0]
        grid = parse_grid(p["grid"] or None, "grid")
        label, guidance = None, 0.0
        if conditional:
            label = None if int(p["class"]) == -1 else check_class(int(p["class"]), self.cfg.model.num_labels)
            guidance = parse_guidance(p["guidance"], "guidance")[0]
            if guidance != 0 and label is None:
                raise ConfigError(f"guidance: guides towards a class; give class too (got guidance {guidance})")
        generator = torch.Generator(device=self.device).manual_seed(int(p["seed"]))
        samples = draw(
            self.model, num, sampler=sampler, nfe=nfe, generator=generator, grid=grid, label=label, guidance=guidance
        )
        if self.vocab is not None:
            return ["".join(self.vocab[i] for i in row) for row in samples.cpu().tolist()]
        return to_uint8_images(samples, self.cfg.data.name)


def check_class(label: int, num_labels: int) -> int:
    if not 0 <= label < num_labels:
        raise ConfigError(f"class: the model was trained with classes 0..{num_labels - 1} (-1: no label); got {label}")
    return label

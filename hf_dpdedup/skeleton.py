"""A member's transformers model built around its stored tensors: the one model builder.

What :meth:`DedupedModel.from_pretrained <hf_dpdedup.modeling.DedupedModel.from_pretrained>` and
the serving pool (:mod:`hf_dpdedup.serving.compose`) share:

- :func:`read_config` — the member's ``config.json`` as a transformers config (typed errors);
- :func:`architecture_class` — the transformers class a config (or the constitution) names;
- :func:`empty_model` — that class with meta tensors and no weight initialisation;
- :func:`check_tensor` — a stored tensor against the slot the config builds (shape and dtype);
- :func:`build_model` — assign a state dict into an empty model, re-tie aliases, check completeness;
- :func:`unexpected_tensors_error`, :func:`missing_weights_error` — the errors of a member whose
  files disagree with its architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from .errors import ConstitutionError, StoreFormatError

#: what to do about a member whose files disagree with each other
RESTORE = "Restore the member (download it again, or re-run add_model from the original model)."


def read_config(member_dir: Path, **overrides: Any) -> Any:
    """The member's transformers config; a missing, invalid or unknown one is a typed error. With
    ``overrides``: ``(config, unused overrides)``, as ``AutoConfig.from_pretrained`` returns them."""
    try:
        if overrides:
            return AutoConfig.from_pretrained(member_dir, return_unused_kwargs=True, **overrides)
        return AutoConfig.from_pretrained(member_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise StoreFormatError(
            f"config.json of member {member_dir} cannot be used ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else exc!r}). Restore the member's config.json (download "
            "the member again, or re-run add_model); an unknown model_type needs a newer transformers."
        ) from None


def architecture_class(config: Any, recorded: str | None) -> type[PreTrainedModel]:
    """The transformers class ``config.architectures`` names (else ``recorded``, the constitution's)."""
    names = list(getattr(config, "architectures", None) or []) or ([recorded] if recorded else [])
    for name in names:
        klass = getattr(transformers, name, None)
        if isinstance(klass, type) and issubclass(klass, PreTrainedModel):
            return klass
    raise ConstitutionError(
        f"config.json names architectures {names!r}, none of which this transformers "
        f"({transformers.__version__}) provides. Upgrade transformers, or pass model_class=."
    )


def empty_model(klass: type[PreTrainedModel], config: Any, dtype: torch.dtype | None, *,
                attn_implementation: str | None = None) -> PreTrainedModel:
    """``klass`` with meta tensors. Weights are assigned right after: transformers' weight
    initialisation is skipped (on meta tensors it is pure Python overhead, most of the
    construction time of a small model)."""
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(), no_init_weights():
        return klass._from_config(config, dtype=dtype, **extra)


def check_tensor(name: str, slot: torch.Tensor | None, tensor: torch.Tensor, *, source: str,
                 member: str | None = None) -> None:
    """The stored ``tensor`` must have the shape and dtype of the ``slot`` the model built from
    config.json has for it (a wrong dtype would otherwise load and fail only in the forward pass);
    ``source`` names the member file it came from. No slot: nothing to check."""
    if slot is None or (slot.shape == tensor.shape and slot.dtype == tensor.dtype):
        return
    whose = f"Member {member!r}: t" if member else "T"
    raise ConstitutionError(
        f"{whose}ensor {name!r} is stored as {tensor.dtype} {list(tensor.shape)} (in the member's {source}) "
        f"but config.json builds it as {slot.dtype} {list(slot.shape)}: the member's files disagree. {RESTORE}"
    )


def check_shapes(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], extras: tuple[str, ...] = ()) -> None:
    """:func:`check_tensor` for every tensor of ``state_dict`` (``extras``: those read from
    extras.safetensors, named so in errors)."""
    expected = dict(named_tensors(model))
    for name, tensor in state_dict.items():
        check_tensor(name, expected.get(name), tensor, source=source_file(name in extras))


def source_file(is_extra: bool) -> str:
    """The member file a tensor is read from."""
    return "extras.safetensors" if is_extra else "dedup_constitution.json"


def unexpected_tensors_error(klass: type, names: list[str], member: str | None = None) -> ConstitutionError:
    """A member holds tensors its class does not have."""
    whose = f"Member {member!r}" if member else "The member"
    return ConstitutionError(
        f"{whose} holds tensors {names[:5]} that {klass.__name__} does not have: config.json and the "
        "stored weights disagree."
    )


def missing_weights_error(klass: type, names: list[str], member: str | None = None) -> ConstitutionError:
    """A member lacks weights its class needs."""
    whose = f"Member {member!r}" if member else "The member"
    return ConstitutionError(
        f"{whose} lacks weights for {names[:5]} of {klass.__name__}; it was saved from another "
        "architecture or is incomplete: re-save it from the original model."
    )


def build_model(
    klass: type[PreTrainedModel],
    config: Any,
    state_dict: dict[str, torch.Tensor],
    *,
    aliases: dict[str, str] | None = None,
    extras: tuple[str, ...] = (),
    skeleton: PreTrainedModel | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Build ``klass`` with no weights (or take ``skeleton``, built so by :func:`empty_model`) and
    assign ``state_dict`` into it; re-tie ``aliases``. (``extras``: the tensors read from
    extras.safetensors, named in errors about them.)"""
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), None)
    model = skeleton if skeleton is not None else empty_model(klass, config, dtype,
                                                             attn_implementation=attn_implementation)
    aliases = aliases or {}
    own = {k: v for k, v in state_dict.items() if k not in aliases}
    check_shapes(model, own, extras)
    result = model.load_state_dict(own, strict=False, assign=True)
    if result.unexpected_keys:
        raise unexpected_tensors_error(klass, list(result.unexpected_keys))
    for alias, canonical in aliases.items():
        _tie(model, alias, canonical)
    if any(t.is_meta for _, t in named_tensors(model)):
        model.tie_weights()  # ties the checkpoint itself omitted (e.g. a saved lm_head)
    still_empty = [n for n, t in named_tensors(model) if t.is_meta]
    if still_empty:
        raise missing_weights_error(klass, still_empty)
    model.eval()
    return model


def named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` by name, tied ones under each of their names."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _tie(model: torch.nn.Module, alias: str, canonical: str) -> None:
    module_name, _, leaf = alias.rpartition(".")
    source_module_name, _, source_leaf = canonical.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        source = model.get_submodule(source_module_name)
    except AttributeError:
        raise ConstitutionError(
            f"The constitution ties {alias!r} to {canonical!r}, but {type(model).__name__} has no such "
            f"module: config.json and the constitution disagree. {RESTORE}"
        ) from None
    if source_leaf in source._parameters:
        setattr(module, leaf, source._parameters[source_leaf])
    else:
        module.register_buffer(leaf, getattr(source, source_leaf))

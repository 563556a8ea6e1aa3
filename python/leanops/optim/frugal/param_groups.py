"""``frugal_param_groups``: the usual choice of which parameters FRUGAL splits."""
import torch

# The last nn.Linear whose own name is one of these is the output head (kept fully AdamW).
HEAD_NAMES = ("lm_head", "head", "output")


def frugal_param_groups(model: torch.nn.Module) -> list[dict]:
    """The usual FRUGAL split of a model: [{"params": ..., "split": True}, {"params": ..., "split": False}].

    The 2-D weights of nn.Linear layers are split. Everything else stays fully AdamW: embeddings, norms, biases,
    and the output head, i.e. a Linear whose weight is an embedding's (tied), and the last Linear whose own name
    is lm_head, head or output. Empty groups are left out; add any option to a group to override it there.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"leanops.optim.frugal_param_groups: argument 'model' must be a torch.nn.Module, "
                        f"got {type(model).__name__}")
    embedding_weights = {id(module.weight) for module in model.modules()
                         if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))}
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    heads = [module for name, module in linears if name.rsplit(".", 1)[-1] in HEAD_NAMES]
    head = heads[-1] if heads else None
    split_ids = {id(module.weight) for _, module in linears
                 if module is not head and module.weight.dim() == 2 and id(module.weight) not in embedding_weights}
    split, full, seen = [], [], set()
    for parameter in model.parameters():  # deduplicated (tied weights appear once)
        if id(parameter) in seen or not parameter.requires_grad:
            continue
        seen.add(id(parameter))
        (split if id(parameter) in split_ids else full).append(parameter)
    groups = []
    if split:
        groups.append({"params": split, "split": True})
    if full:
        groups.append({"params": full, "split": False})
    return groups


# Names (of a named parameter, from model.named_parameters()) that mark an embedding among 2-D tensors.
EMBEDDING_NAMES = ("embed", "wte", "wpe")


def looks_like_projection(parameter: torch.Tensor, name: str | None = None) -> bool:
    """The rule for bare parameters (no module to look at): a 2-D tensor with both sides > 1 is taken for a
    projection matrix (an nn.Linear weight); 1-D tensors (norms, biases), scalars, convolution kernels (> 2-D) and
    1 x n / n x 1 matrices are not. Given a name (named parameters), a 2-D tensor named like an embedding (a part
    containing embed, wte or wpe) or an output head (its module named lm_head, head or output) is not either."""
    if parameter.dim() != 2 or min(parameter.shape) <= 1:
        return False
    if name is None:
        return True
    parts = name.split(".")
    if any(key in part for part in parts for key in EMBEDDING_NAMES):
        return False
    return not (len(parts) >= 2 and parts[-2] in HEAD_NAMES)


def bare_parameter_groups(entries: list) -> tuple[list[dict], int, int]:
    """(groups, split count, total) for bare parameters (tensors, or (name, tensor) pairs as named_parameters()
    gives them): [{"params": the projection-like ones (looks_like_projection), "split": True},
    {"params": the others, "split": False}], empty groups left out, each keeping the entries' order."""
    split, full = [], []
    for entry in entries:
        name, parameter = entry if isinstance(entry, tuple) else (None, entry)
        (split if isinstance(parameter, torch.Tensor) and looks_like_projection(parameter, name) else full).append(
            entry)
    groups = []
    if split:
        groups.append({"params": split, "split": True})
    if full:
        groups.append({"params": full, "split": False})
    return groups, len(split), len(entries)

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

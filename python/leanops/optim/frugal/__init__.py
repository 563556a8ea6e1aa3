"""FRUGAL: AdamW state on a subspace of the gradient, a state-free update on the rest.

Zmushko et al. 2024, "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training".
The gradient G of every *split* parameter (a parameter group with ``split=True``) is cut in two:

    G = G_full + R,        G_full in a low-dimensional subspace S,   R = G - G_full

- G_full gets AdamW, with the moments m, v kept only for the coordinates of S (so the state of a split parameter
  is about ``density`` times AdamW's 8 bytes per element):

      m <- beta1 m + (1 - beta1) g_S,    v <- beta2 v + (1 - beta2) g_S^2,
      theta <- theta - lr_full * back( (m / (1 - beta1^t)) / (sqrt(v) / sqrt(1 - beta2^t) + eps) )

  with lr_full = lr * state_full_lr_scale, g_S the coordinates of G in S and ``back`` the map from S back to the
  parameter's shape.
- R gets a state-free step with lr_free = lr * state_free_lr_scale:
  ``"signsgd"``: theta <- theta - lr_free * sign(R); ``"sgd"``: theta <- theta - lr_free * R; ``"none"``: nothing.
- Decoupled weight decay on the whole parameter first, as torch.optim.AdamW: theta <- theta (1 - lr * weight_decay).

What is split: ``frugal_param_groups(model)`` (recommended) chooses by module (nn.Linear weights, not embeddings,
norms, biases or the output head). Given bare parameters (``FRUGAL(model.parameters())``, no groups), FRUGAL cannot
see the modules: it puts the tensors that look like projection matrices (2-D with both sides > 1; with named
parameters, also not named like an embedding or a head) in a group with ``split=True`` and the others (1-D norms and
biases, convolution kernels, 1 x n matrices) in a group with ``split=False``, and says so in a UserWarning.
``split_parameters()`` and the optimizer's repr list the split tensors (group, index, shape). A group given as a dict
is taken as it is (``split`` defaults to True there).

The constructor takes torch.optim.AdamW's arguments with its defaults (weight_decay=0.01, tensor lr, maximize;
foreach/fused accepted and without effect; amsgrad, capturable, differentiable refused by name), and
``add_param_group`` checks a new group as the constructor does.

Parameters of groups with ``split=False`` get plain AdamW (with backend="reference", the same operations as
torch.optim.AdamW(foreach=False), bit for bit). A parameter is handled as the matrix ``param.view(shape[0], -1)``
(a 1-D tensor as one row).

Subspaces (``projection``), k = round(density * size) with Python's round:

- ``"blockwise"``: k = round(density * number of tensors in the group) whole tensors are state-full (AdamW on
  the whole tensor), the others fully state-free. ``block_order``: ``"random"`` (k tensors drawn without
  replacement), ``"ascending"`` / ``"descending"`` (a window of k consecutive tensors, in group order or its
  reverse, moving on by k at every switch, wrapping around).
- ``"columns"`` / ``"rows"``: k random columns / rows of each matrix (sorted, stored as int32); the moments are
  the (m x k) / (k x n) submatrices.
- ``"random"``: on the smaller side s = min(m, n), P (s x r) orthonormal, r = round(density * s), the Q of the
  QR of a seeded Gaussian. For m <= n, g_S = P^T G (r x n), back(U) = P U; for m > n, g_S = G P (m x r),
  back(U) = U P^T. G_full = back(g_S).
- ``"svd"``: as "random" with P the top-r left (m <= n) or right (m > n) singular vectors of the gradient at the
  switch step (GaLore), recomputed at every switch.
- At density 1 every projection is AdamW: blockwise, columns and rows bit for bit (torch.optim.AdamW(foreach=False)'s
  operations with backend="reference"); random and svd take P = I (r = s: the whole space in the parameter's own
  coordinates; any other orthonormal P would be AdamW in rotated coordinates, whose per-coordinate v differs) and
  equal AdamW to float32 rounding (the update goes through P U).

The subspaces are redrawn every ``update_gap`` steps (optimizer steps 1, 1 + update_gap, ...), from a
torch.Generator seeded with ``seed`` (never the global RNG); the draws happen in group order, parameter by parameter,
whether or not a parameter has a gradient at that step (svd excepted: it needs one), so a run is reproducible.
``on_switch`` says what happens to the moments when a subspace changes (an unchanged subspace, e.g. any projection
at density=1, keeps its moments whatever the option):

- ``"reset"``: the moments are zeroed and the bias correction restarts (step count 0). For blockwise, the whole
  group is reset when its active set changes; tensors leaving it drop their state.
- ``"project"``: columns/rows: the moments of the coordinates that stay are kept, new coordinates start at zero,
  the step count goes on. blockwise: tensors that stay active keep their state, newly active ones start fresh.
  random/svd: with C = P_new^T P_old (r x r), m' = C m and v' = (C * C) v (C squared elementwise: an
  approximation that keeps v' >= 0; exact when C is a signed permutation), for the m > n side m' = m C^T,
  v' = v (C * C)^T; the step count goes on.

Distributed training. Every rank uses the subspace that rank 0 drew: it is broadcast at each switch (indices,
projectors, active blocks), rather than trusting that the ranks' generators agree, and at the first step every rank
takes rank 0's generator state (ranks seeded differently then draw alike, and a checkpoint's generator is rank 0's
whichever rank's copy it keeps). The group is a DTensor parameter's device-mesh group, else the default group.

- DistributedDataParallel: every rank steps the same all-reduced gradients, and the ranks stay identical.
- FSDP2 (``torch.distributed.fsdp.fully_shard``: DTensor parameters sharded on dim 0 of a 1-D mesh, unevenly when
  dim 0 is not a multiple of the world size; Replicate DTensors work too, other layouts are refused with
  NotImplementedError): each rank steps its local shard (``param.to_local()``, ``param.grad.to_local()``), which
  holds a range of the matrix's rows (a range of the columns for a 1-D parameter), with the kernels unchanged; the
  optimizer's ``state`` holds this rank's pieces as plain tensors. The result is the single-device one:
  blockwise (whole tensors: the same active set everywhere), columns of a row-sharded matrix (the same column
  indices on every rank; moments sharded by rows) and rows (each rank keeps the moments of the subspace rows that
  fall in its range: no communication, about 1/world of the state per rank) bit for bit; random and svd to float32
  rounding: G P and back-projection are local, but for m <= n, P^T G sums over the ranks' rows, an all-reduce of
  the r x n float32 result at every step, and those moments (r x n) are replicated on every rank; svd also gathers
  the whole gradient at each switch (``full_tensor()``, an all-gather every update_gap steps), and the mesh's
  first rank computes the SVD.

``state_dict()`` carries, besides the moments, the indices / projectors and, in every parameter group, the entry
"frugal": the active blocks, the step counter and the generator state (uint8), so ``torch.load(weights_only=True)``
and ``torch.distributed.checkpoint`` (``get_state_dict`` / ``set_state_dict`` from
``torch.distributed.checkpoint.state_dict``, which keep "state" and "param_groups" only) round-trip, and a resumed
run continues bit for bit. DCP loads in place into tensors of the fresh optimizer's state dict, so the saved shapes
must not depend on the draw: blockwise groups carry zero moments (step 0) for their inactive tensors, and the rows
moments of a row-sharded matrix (or columns of a sharded 1-D parameter) travel in the parameter's matrix shape,
zeros outside the subspace: a transient of AdamW's state size for those tensors while the state dict lives.
Sharded state goes as DTensors (every rank's piece is saved), replicated state (indices, projectors, the r x n
random/svd moments) as plain tensors. A whole (plain) tensor where a DTensor piece is expected, e.g. a single-device
checkpoint or DCP's ``full_state_dict``, is cut to this rank's piece by ``load_state_dict``.
DCP's ``flatten_optimizer_state_dict`` option is not supported (it drops the "frugal" entries: load_state_dict
then refuses the state dict).

``load_state_dict`` checks the whole state dict before it changes anything (``state_checks``): another optimizer's
state dict (torch.optim.AdamW's, CollageAdamW's), groups that do not match, invalid options or "frugal" entries,
unexpected or missing keys, tensors of the wrong dtype or shape (a DTensor by its global shape, then every rank's
piece by its local shape), indices that are negative, past the matrix, unsorted or repeated, projectors that are
not (min(m, n), r), and a Collage compensation under precision "fp32" are refused (ValueError, TypeError) with the
parameter (group and index in it) and the key named; the optimizer is then exactly as it was.

Parameters in any memory format (channels-last conv weights) are stepped through their logical matrix view.

The package:

- ``optimizer``: the ``FRUGAL`` class (constructor, step, state_dict, load_state_dict, state_bytes);
- ``options``: the accepted option values, their validation, the backend that steps a parameter;
- ``parameter_state``: what is kept per parameter (moments, step count, compensation) and how it starts;
- ``subspaces``: drawing the subspaces and moving the moments on a switch;
- ``reference_step``: the step in plain PyTorch (backend "reference": torch.optim.AdamW's operations);
- ``fused_step``: the step through the fused split-step kernels (backends "cpu", "cuda", "triton");
- ``checkpoint``: packing and unpacking the state dict;
- ``state_checks``: what load_state_dict checks before it changes anything;
- ``param_groups``: ``frugal_param_groups``, the usual choice of what is split.
"""
from .optimizer import FRUGAL
from .options import BLOCK_ORDERS, ON_SWITCH, PRECISIONS, PROJECTIONS, STATE_FREE
from .param_groups import frugal_param_groups

__all__ = ["BLOCK_ORDERS", "FRUGAL", "ON_SWITCH", "PRECISIONS", "PROJECTIONS", "STATE_FREE", "frugal_param_groups"]

"""The packed weight format's constants, one home (pure: no torch), shared by ``patchc.packing``
(which writes it) and the kernel generator (which reads it); the format is described in
``patchc.packing``."""

# the six 2-of-4 patterns, by pattern id: (lower, upper) kept position of a group of 4
PATTERNS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
# per packed tile-row record (int32): original tile-row, weight rows, 2:4 / dense tile counts, the
# ragged tile-column's kind (1: the row's last 2:4 tile, 2: its last dense tile), the starts of its
# full-width tiles' regions and of its ragged tile (2:4 values, 2:4 metadata, dense values), in
# units of ALIGN bytes
ROW_FIELDS = ("orig", "rows", "n_s", "n_d", "edge", "s_vals", "s_meta", "d_vals", "s_evals", "s_emeta", "d_evals")
ROW = {name: i for i, name in enumerate(ROW_FIELDS)}
ALIGN = 16
# the tensors a kernel reads, in kernel argument order
KERNEL_BUFFERS = ("rows", "kidx", "sparse_vals", "sparse_meta", "dense_vals")
GROUPS_PER_WORD = 8          # 4-bit pattern ids per int32 metadata word

"""`bfn bench`: performance ratios measured side by side (``bench``), and the paper networks on a GPU
(``device``)."""

"""Test helpers, imported by the test modules as ``from helpers.<module> import ...``.

Everything here is deliberately independent of the library's numerics:

* :mod:`helpers.hypothesis_profile` - the deterministic settings of the property tests;
* :mod:`helpers.random_cnn` - the random-CNN strategy (DAGs with residual adds and concats) and
  the transition strategy;
* :mod:`helpers.references` - the local rules written out with an explicit im2col
  (``unfold`` for 2-d convs, strided slicing for 1-d/3-d) and weak supervision in exact rational
  arithmetic;
* :mod:`helpers.prefix_oracle` - the prefix re-derived with networkx on a plain
  ``torch.fx.symbolic_trace``;
* :mod:`helpers.saved_tensors` - saved-for-backward tensors recorded with
  ``torch.autograd.graph.saved_tensors_hooks``;
* :mod:`helpers.state` - copies of parameters, gradients and RNG states, and their comparison;
* :mod:`helpers.data` - a learnable toy data set in the Fashion-MNIST file format;
* :mod:`helpers.devices` - the ``cuda`` mark and deterministic CUDA settings.

``tests/`` has no ``__init__.py``: pytest puts it on ``sys.path`` (``rootdir``-relative, "prepend"
import mode), so ``helpers`` resolves from the repository root and from a fresh clone alike.
"""

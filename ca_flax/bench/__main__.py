"""`python -m ca_flax.bench`: see `ca_flax.bench.cli`."""

from ca_flax.bench.cli import main
from ca_flax.cpu import hugepages

hugepages.reexec_with_huge_pages()  # for both sides alike: the host's allocator setting
main()

"""The old `python -m` path of `sdtl_jax.datasets.generate.tiny`, kept until the next release
(`sdtl_jax/moved.py`)."""

if __name__ == '__main__':
    from sdtl_jax import moved

    moved.forward('sdtl_jax.generate.tiny')

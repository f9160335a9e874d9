"""The contextual training recipe's clustering: paired spherical k-means in JAX over the
mesh (`kmeans`), paired query/document vectors (`pairs`), batches packed along a
nearest-centroid tour (`packing`), and the `cde-jax cluster` job that ties them to a
training file (`job`)."""

from .kmeans import KMeansConfig, KMeansResult, Points, place_points, spherical_kmeans

__all__ = ["KMeansConfig", "KMeansResult", "Points", "place_points", "spherical_kmeans"]

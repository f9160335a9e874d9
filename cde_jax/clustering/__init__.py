"""The contextual training recipe's clustering: paired query/document points (`pairs`),
spherical k-means in JAX over every device of every process (`kmeans`), batches packed
along a nearest-centroid tour (`packing`), and the `cde-jax cluster` job that ties them to
a training file (`job`)."""

from .job import ClusterConfig, ClusterResult, cluster
from .kmeans import KMeansConfig, KMeansResult, Points, place_points, spherical_kmeans
from .packing import Packing, greedy_tour, pack_batches
from .pairs import paired_points

__all__ = ["ClusterConfig", "ClusterResult", "KMeansConfig", "KMeansResult", "Packing",
           "Points", "cluster", "greedy_tour", "pack_batches", "paired_points",
           "place_points", "spherical_kmeans"]

"""Pure reward functions: text and ids in, numbers out (no torch)."""

from rewards.catalog import Catalog, Item, normalize_title, rank_hits
from rewards.lists import ParsedLine, format_list, parse_list
from rewards.ranking import evaluate_list, mean_metrics, rank_rewards, sequence_ndcg

__all__ = [
    "Catalog", "Item", "ParsedLine", "evaluate_list", "format_list", "mean_metrics", "normalize_title",
    "parse_list", "rank_hits", "rank_rewards", "sequence_ndcg",
]

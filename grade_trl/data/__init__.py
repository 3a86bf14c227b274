from .imdb import clean_review, load_imdb, make_imdb_splits, prompt_dataset, review_prompt

__all__ = ["clean_review", "load_imdb", "make_imdb_splits", "prompt_dataset", "review_prompt"]

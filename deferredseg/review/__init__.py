"""The review loop after prediction: tasks, their database, the review server, merging."""

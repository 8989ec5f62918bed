"""Data and rewards: real dataset loaders (ViRL39K, Geometry3K, local files), generated perception tasks, the reward
registry, and the recipe's script arguments that route a dataset name to its loader."""

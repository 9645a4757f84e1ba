"""RAPTOR (Eschmann et al. 2025): a tiny recurrent quadrotor foundation policy distilled from many RL teachers."""

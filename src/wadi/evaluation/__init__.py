"""Evaluation: images and scores (wadi eval), metrics, the weight-space analysis."""

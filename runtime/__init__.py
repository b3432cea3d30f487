"""fastardiff.runtime"""

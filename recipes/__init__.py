"""fastardiff.recipes"""

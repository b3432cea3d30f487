"""fastardiff.exporter"""

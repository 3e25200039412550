if __name__ != "fedmerge.federation":  # the repository root is on sys.path in a checkout
    raise ImportError(f"import this package as fedmerge.federation, not {__name__}")

if __name__ != "fedmerge.clients":  # the repository root is on sys.path in a checkout
    raise ImportError(f"import this package as fedmerge.clients, not {__name__}")

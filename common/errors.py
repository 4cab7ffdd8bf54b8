"""The one exception type the suite raises for bad input, so every entry point can print it as one clear line."""


class SuiteError(Exception):
    """A problem with the user's input (config, paper file, dataset), not a bug in the suite."""


class DatasetMissing(SuiteError):
    pass


class DatasetCorrupt(SuiteError):
    pass

"""Store URLs as we take them: never with a password, and the driver each one needs named when it is missing.

A store's URL (`tracking.tracking_uri`, `sweep.storage`, a sweep file's `storage`) is logged as a
param, committed with every experiment and printed; a password in it would be too. Each client reads
its password from the environment or from its own file instead, so a URL that holds one is refused.
A user name alone stays: it is no secret, and libpq picks the ~/.pgpass line by it.

Plain Python only: params.py validates with it, and a database library imported there would slow
every stage.
"""

from __future__ import annotations

import importlib.util
from urllib.parse import parse_qs, urlsplit, urlunsplit

from cifar_rounds.core.errors import causes

MLFLOW_PLACE = "MLFLOW_TRACKING_PASSWORD (and the user in MLFLOW_TRACKING_USERNAME) or ~/.mlflow/credentials"
# where each kind of store takes its password instead, by the URL's dialect (the scheme before '+driver')
PASSWORD_PLACES = {
    "http": MLFLOW_PLACE,
    "https": MLFLOW_PLACE,
    "postgresql": "PGPASSWORD or ~/.pgpass (PGPASSFILE names another file)",
    "mysql": "an option file the URL names (?read_default_file=~/.my.cnf)",
}
ELSEWHERE = "the environment or the database driver's own file"
QUERY_PASSWORDS = ("password", "passwd")  # libpq and the MySQL drivers also take one as a URL parameter
# SQLAlchemy's database drivers: the module, the package that installs it, the scheme that names it
DRIVERS = {
    "psycopg": ("psycopg[binary]", "postgresql+psycopg"),  # SQLAlchemy 2.1's choice for a bare postgresql://
    "psycopg2": ("psycopg2-binary", "postgresql+psycopg2"),
    "MySQLdb": ("mysqlclient", "mysql+mysqldb"),
    "pymysql": ("PyMySQL", "mysql+pymysql"),
}


def password_refusal(url: str) -> str | None:
    """'holds a password; put it in ..., not in the URL' when `url` carries one; None when it does not."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL (an unbalanced '[' ...): whoever opens it says so
        return None
    query = parse_qs(parts.query)
    if not parts.password and not any(query.get(key) for key in QUERY_PASSWORDS):
        return None
    place = PASSWORD_PLACES.get(parts.scheme.partition("+")[0].lower(), ELSEWHERE)
    return f"holds a password; put it in {place}, not in the URL"


def passwordless(url: str) -> str:
    """`url` itself; ValueError (pydantic's validation error) saying where its password goes when it holds one."""
    refusal = password_refusal(url)
    if refusal is not None:
        raise ValueError(refusal)
    return url


def without_password(url: str) -> str:
    """The URL as messages show it: a password in its user part replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}"))


def missing_driver(error: BaseException, field: str, url: str) -> str | None:
    """One line naming the package to install when `error`, or an error it came from, is a module not found
    (a store's driver, imported only when the store is opened), and the installed driver that the URL could
    name instead; None otherwise."""
    absent = next((c for c in causes(error) if isinstance(c, ModuleNotFoundError) and c.name), None)
    if absent is None:
        return None
    module = absent.name.partition(".")[0]
    package = DRIVERS.get(module, (module, ""))[0]
    scheme = urlsplit(url).scheme
    dialect = scheme.partition("+")[0]
    other = [s for m, (_, s) in DRIVERS.items() if m != module and s.startswith(f"{dialect}+") and installed(m)]
    instead = f", or name the driver installed here: {other[0]}://..." if other else ""
    where = f"{scheme}://" if scheme else url
    return f"{field}: {where} needs the package {package} (pip install '{package}'){instead}"


def installed(module: str) -> bool:
    """Whether `module` is installed (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False

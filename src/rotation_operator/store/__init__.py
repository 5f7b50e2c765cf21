"""The store layer: every SQL statement of the package, over the operator's own tables,
the targets and the catalog.  No Kubernetes.

Every statement lives in one of these modules; the layers above call their functions (the
mover executes the batch statements built here).  Dynamic SQL is composed only with
``psycopg.sql`` (``sql.SQL(...).format(sql.Identifier(...))``, names from :mod:`.names`);
every value is a query parameter.  Statements with no identifier in them are plain
literals.

* :mod:`.database`: connections, and the one translation of database errors;
* :mod:`.names`: the tables of a keys table and a target's identifier (the one way
  identifiers are built);
* :mod:`.schema`: creating and migrating the operator's own tables;
* :mod:`.keys`: the keys table (DEK rows, states);
* :mod:`.rotations`: rotation records and their fences;
* :mod:`.coverage`: which targets a keys table covers (the meta table);
* :mod:`.legacy`: the meta table's legacy record (legacy rows migrated; reads closed?);
* :mod:`.audit`: the hash-chained audit log;
* :mod:`.keystore`: the facade over those tables, and the one place DEKs meet KEKs;
* :mod:`.catalog`: what a target is made of (heaps, triggers, grants), before any write;
* :mod:`.targets`: counts, stale and legacy rows, statistics, the Atomic mode's lock;
* :mod:`.batches`: a rotation batch's statements, and the size of a heap;
* :mod:`.load`: what the throttle reads (replicas, sessions a batch blocks);
* :mod:`.advisory` and :mod:`.locks`: advisory-lock keys, the rotation lock, and the
  transactions in flight a handover waits for.
"""

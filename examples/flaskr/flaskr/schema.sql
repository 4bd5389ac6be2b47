DROP TABLE IF EXISTS post;
DROP TABLE IF EXISTS "user";

CREATE TABLE "user" (
  id integer PRIMARY KEY GENERATED ALWAYS AS IDENTITY,
  username text UNIQUE NOT NULL,
  password text NOT NULL
);

CREATE TABLE post (
  id integer PRIMARY KEY GENERATED ALWAYS AS IDENTITY,
  author_id integer NOT NULL REFERENCES "user" (id),
  created timestamptz NOT NULL DEFAULT now(),
  title text NOT NULL,
  body text NOT NULL
);

-- Which backend of its route served a request (the routes file's backends[].name); on a
-- failure, the last one tried. Set by the event that moves the status forward, like result.
ALTER TABLE requests ADD COLUMN backend text;

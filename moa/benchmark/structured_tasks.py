"""The structured-output workload of ``moa bench --structured``: questions, each with the JSON
Schema its answer must keep, in five levels of growing difficulty.

1. flat objects of two to four scalar properties, all required;
2. the same with enums and optional properties;
3. arrays: of scalars, with bounds, of enums;
4. nested objects, two levels, required at each;
5. the lot: arrays of objects holding enums, nested objects and arrays, ``$defs`` references,
   ``anyOf`` with null, string formats.

Each question offers the values a correct document holds (quoted names, proper nouns, numbers,
an enum value it mentions), as an extraction task does; what the benchmark measures is whether
the final answer keeps the schema, not whether its values are right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LEVELS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class StructuredTask:
    """One question and the schema its answer must keep."""

    id: str
    level: int
    question: str
    schema: dict[str, Any]


def _obj(required: list[str] | None = None, **props: Any) -> dict[str, Any]:
    """An object schema of ``props``; every property required unless ``required`` says which."""
    return {"type": "object", "properties": props, "required": list(props) if required is None else required}


STR: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
NUM: dict[str, Any] = {"type": "number"}
BOOL: dict[str, Any] = {"type": "boolean"}


def _enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def _list(items: dict[str, Any], low: int | None = None, high: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": items}
    if low is not None:
        schema["minItems"] = low
    if high is not None:
        schema["maxItems"] = high
    return schema


TASKS: tuple[StructuredTask, ...] = (
    # -- 1: flat, scalars, all required
    StructuredTask(
        "flat-city", 1, 'Give the city "Lisbon" and its population of 545000.', _obj(city=STR, population=INT)
    ),
    StructuredTask("flat-book", 1, 'The book "Dune" was published in 1965.', _obj(title=STR, year=INT)),
    StructuredTask("flat-price", 1, 'The item "desk lamp" costs 39.5 dollars.', _obj(item=STR, price=NUM)),
    StructuredTask(
        "flat-contact", 1, "Ada Lovelace can be reached at ada@example.com.", _obj(name=STR, email=STR)
    ),
    StructuredTask(
        "flat-flight",
        1,
        'Flight "TP1234" leaves Porto with 180 seats.',
        _obj(flight=STR, origin=STR, seats=INT),
    ),
    StructuredTask(
        "flat-sensor",
        1,
        'Sensor "north-3" reads 21.5 degrees; is it online?',
        _obj(sensor=STR, reading=NUM, online=BOOL),
    ),
    StructuredTask(
        "flat-order",
        1,
        'Order "A-77" is for 3 units at 12.25 each, shipped to Oslo.',
        _obj(order_id=STR, quantity=INT, unit_price=NUM, city=STR),
    ),
    # -- 2: enums and optional properties
    StructuredTask(
        "enum-ticket",
        2,
        'Ticket "login fails" has high priority.',
        _obj(summary=STR, priority=_enum("low", "medium", "high")),
    ),
    StructuredTask(
        "enum-sentiment",
        2,
        "The review says the hotel was wonderful: positive sentiment.",
        _obj(sentiment=_enum("positive", "neutral", "negative"), reason=STR),
    ),
    StructuredTask(
        "enum-plan",
        2,
        'John Smith wants the Enterprise plan, billed "yearly".',
        _obj(name=STR, plan=_enum("Free", "Pro", "Enterprise"), billing=_enum("monthly", "yearly")),
    ),
    StructuredTask(
        "optional-note",
        2,
        'Book a table for 4 under "Garcia" at 20 hours.',
        _obj(["name", "guests"], name=STR, guests=INT, hour=INT, note=STR),
    ),
    StructuredTask(
        "enum-weather",
        2,
        "Tomorrow in Madrid will be sunny with 28 degrees.",
        _obj(["city", "condition"], city=STR, condition=_enum("sunny", "cloudy", "rain", "snow"), high=NUM),
    ),
    StructuredTask(
        "enum-severity",
        2,
        'The incident "disk full" is critical and affects 2 services.',
        _obj(
            ["title", "severity"],
            title=STR,
            severity=_enum("minor", "major", "critical"),
            services=INT,
            paged=BOOL,
        ),
    ),
    # -- 3: arrays
    StructuredTask(
        "array-tags",
        3,
        'Tag the article "Rust in production" with three keywords.',
        _obj(title=STR, tags=_list(STR, 1, 5)),
    ),
    StructuredTask("array-scores", 3, "The scores were 7, 9 and 4.", _obj(scores=_list(INT, 3, 3), best=INT)),
    StructuredTask(
        "array-colours",
        3,
        "Pick the primary colours: red, blue and yellow.",
        _obj(colours=_list(_enum("red", "green", "blue", "yellow"), 1)),
    ),
    StructuredTask(
        "array-steps", 3, 'List the steps to make "tea".', _obj(dish=STR, steps=_list(STR, 2, 8), minutes=INT)
    ),
    StructuredTask(
        "array-languages",
        3,
        "Maria speaks Spanish, English and French.",
        _obj(person=STR, languages=_list(STR, 1), native=STR),
    ),
    StructuredTask(
        "array-ports",
        3,
        'The server "web-1" listens on ports 80, 443 and 8080.',
        _obj(host=STR, ports=_list({"type": "integer", "minimum": 1, "maximum": 65535}, 1, 16)),
    ),
    # -- 4: nested objects
    StructuredTask(
        "nested-address",
        4,
        'Ship to "Ana Costa", 12 Rua Augusta, Lisbon.',
        _obj(name=STR, address=_obj(street=STR, number=INT, city=STR)),
    ),
    StructuredTask(
        "nested-product",
        4,
        'The "Trail 2" shoe costs 89.9 euros and weighs 310 grams.',
        _obj(product=STR, price=_obj(amount=NUM, currency=_enum("EUR", "USD", "GBP")), weight_g=INT),
    ),
    StructuredTask(
        "nested-meeting",
        4,
        'Meeting "budget review" with Lee on 2025-03-04 in room 5.',
        _obj(title=STR, when=_obj(date={"type": "string", "format": "date"}, room=INT), host=STR),
    ),
    StructuredTask(
        "nested-employee",
        4,
        "Priya Nair works in Engineering as a senior developer in Berlin.",
        _obj(
            ["name", "role"],
            name=STR,
            role=_obj(team=STR, level=_enum("junior", "mid", "senior")),
            office=_obj(city=STR, remote=BOOL),
        ),
    ),
    StructuredTask(
        "nested-recipe",
        4,
        'The recipe "pancakes" serves 4 and takes 20 minutes.',
        _obj(recipe=STR, meta=_obj(servings=INT, minutes=INT, difficulty=_enum("easy", "medium", "hard"))),
    ),
    StructuredTask(
        "nested-device",
        4,
        'Device "gw-7" runs firmware 3 on a Raspberry board in Lyon.',
        _obj(device=STR, firmware=_obj(major=INT, minor=INT), site=_obj(city=STR, rack=STR)),
    ),
    # -- 5: the lot
    StructuredTask(
        "deep-invoice",
        5,
        'Invoice "INV-9" to Acme: 2 chairs at 45 and 1 desk at 120, in EUR.',
        _obj(
            invoice=STR,
            customer=STR,
            currency=_enum("EUR", "USD"),
            lines=_list(_obj(item=STR, quantity=INT, price=NUM), 1),
        ),
    ),
    StructuredTask(
        "deep-team",
        5,
        'Team "Atlas" has Kim as lead and Omar and Lena as engineers.',
        _obj(
            team=STR,
            members=_list(_obj(name=STR, role=_enum("lead", "engineer", "designer")), 1, 10),
        ),
    ),
    StructuredTask(
        "deep-itinerary",
        5,
        "Fly from Paris to Tokyo on 2025-05-01, then train to Kyoto.",
        _obj(
            legs=_list(
                _obj(
                    origin=STR,
                    destination=STR,
                    mode=_enum("flight", "train", "bus"),
                    date={"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
                ),
                1,
            ),
            traveller=_obj(["name"], name=STR, frequent_flyer=BOOL),
        ),
    ),
    StructuredTask(
        "deep-defs",
        5,
        'Ship "parcel 12" from Oslo to Bergen.',
        {
            "$defs": {"place": _obj(city=STR, country=STR)},
            "type": "object",
            "properties": {"parcel": STR, "from": {"$ref": "#/$defs/place"}, "to": {"$ref": "#/$defs/place"}},
            "required": ["parcel", "from", "to"],
        },
    ),
    StructuredTask(
        "deep-survey",
        5,
        "The survey had 3 questions; answers were yes, no and maybe.",
        _obj(
            questions=_list(
                _obj(
                    number=INT, answer=_enum("yes", "no", "maybe"), comment={"anyOf": [STR, {"type": "null"}]}
                ),
                1,
            ),
            complete=BOOL,
        ),
    ),
    StructuredTask(
        "deep-catalog",
        5,
        'The catalog "Spring" lists a "linen shirt" in sizes STR, M and L.',
        _obj(
            catalog=STR,
            products=_list(
                _obj(
                    name=STR,
                    sizes=_list(_enum("XS", "S", "M", "L", "XL"), 1),
                    stock=_obj(warehouse=STR, units=INT),
                ),
                1,
            ),
        ),
    ),
    StructuredTask(
        "deep-incident",
        5,
        'Incident "api latency" on 2025-02-10: the EU region is degraded, US is up.',
        _obj(
            title=STR,
            opened={"type": "string", "format": "date"},
            regions=_list(
                _obj(region=_enum("EU", "US", "APAC"), status=_enum("up", "degraded", "down")), 1, 3
            ),
            owner=_obj(["team"], team=STR, pager={"anyOf": [STR, {"type": "null"}]}),
        ),
    ),
)

"""Word lists and templates of the example tasks (:mod:`make_data`): one set for the training distribution (the
``train.jsonl`` and in-template ``test.jsonl`` rows) and a held-out set for the out-of-template ``test_ood.jsonl``
rows. Each held-out list is disjoint from its training list (``make_data`` asserts it), so an out-of-template row
carries wordings, sentence shapes, names, places and headlines that no training row has.

Rules the lists keep, so that every answer stays unambiguous: a text names exactly one person (``{first}
{last}``); city and company names are not person names; no first name is also a last name; a headline's topic
follows from its own words, not from a name in it.
"""

from __future__ import annotations

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# ---- people, places, organisations ----------------------------------------------------------------------------
FIRST = {
    "train": ["Anna", "Maria", "John", "Peter", "Laura", "David", "Sofia", "James", "Emma", "Lucas", "Nina", "Paul",
              "Clara", "Oscar", "Julia", "Martin", "Elena", "Victor", "Rosa", "Daniel", "Alice", "Thomas", "Sara",
              "Felix", "Hannah", "Omar", "Priya", "Wei", "Kenji", "Fatima", "Ahmed", "Ingrid", "Lars", "Mateo",
              "Lucia", "Chloe", "Noah", "Olivia", "Ethan", "Grace", "Samuel", "Yara", "Ravi", "Mei", "Carlos", "Ana",
              "Tomas", "Greta", "Ivan", "Olga", "Pierre", "Amelie", "Diego", "Isabel", "Kofi", "Amina", "Liam",
              "Zoe", "Hugo", "Leah", "Marco", "Sven", "Aisha", "Jonas", "Erik", "Nora", "Leon", "Ruth", "Vera",
              "Malik"],
    "ood": ["Amara", "Tobias", "Ines", "Rahul", "Yuki", "Svetlana", "Mateus", "Folake", "Bjorn", "Camille",
            "Dmitri", "Esther", "Hamid", "Ilse", "Junho", "Katarina", "Lorenzo", "Marisol", "Nikhil", "Odette",
            "Pablo", "Quentin", "Rania", "Stellan", "Thandiwe", "Ulrich", "Valentina", "Wanjiru", "Xavier", "Yusuf",
            "Zofia", "Anders", "Beatriz", "Cyrus", "Dalia", "Emeka", "Freya", "Gustavo", "Helga", "Idris"],
}
LAST = {
    "train": ["Berg", "Lopez", "Smith", "Novak", "Keller", "Brown", "Rossi", "Fischer", "Silva", "Walsh", "Moreau",
              "Jensen", "Costa", "Wagner", "Murphy", "Hansen", "Ortiz", "Baker", "Meyer", "Clarke", "Evans", "Dubois",
              "Tanaka", "Kowalski", "Nguyen", "Patel", "Schmidt", "Garcia", "Larsen", "Petrov", "Haddad", "Mensah",
              "Okonkwo", "Lindqvist", "Romano", "Martins", "Chen", "Singh", "Ferreira", "Nakamura", "Horvat",
              "Szabo", "Andersen", "Hughes", "Fraser", "Moretti", "Bauer", "Weber", "Richter", "Castillo", "Morales",
              "Reyes", "Vargas", "Ibrahim", "Osei", "Sato", "Yamamoto", "Park", "Dumont", "Laurent", "Girard",
              "Bianchi", "Greco", "Popescu", "Jovanovic", "Virtanen", "Nielsen", "Holm", "Karlsson", "Ahmadi"],
    "ood": ["Okafor", "Brennan", "Vasquez", "Lindgren", "Kuznetsov", "Achterberg", "Delacroix", "Eriksen",
            "Fontaine", "Gallagher", "Hoffmann", "Iwasaki", "Jablonski", "Kariuki", "Lombardi", "Mwangi", "Nordstrom",
            "Oyelaran", "Pereira", "Quiroga", "Rasmussen", "Sandoval", "Takahashi", "Ugarte", "Valdez", "Wojcik",
            "Yilmaz", "Zielinski", "Abernathy", "Bergstrom", "Cavanagh", "Dimitrov", "Esposito", "Fitzgerald",
            "Gonzaga", "Halvorsen", "Kaminski", "Mahlangu", "Novotny", "Salazar"],
}
CITIES = {
    "train": ["Lisbon", "Oslo", "Denver", "Madrid", "Nairobi", "Osaka", "Dublin", "Toronto", "Lyon", "Perth",
              "Seattle", "Hamburg", "Porto", "Austin", "Krakow", "Leeds", "Boston", "Vienna", "Prague", "Seville",
              "Manila", "Lagos", "Quito", "Chicago", "Milan", "Munich", "Glasgow", "Helsinki", "Melbourne", "Cairo"],
    "ood": ["Valparaiso", "Tbilisi", "Winnipeg", "Gdansk", "Adelaide", "Bilbao", "Tampere", "Accra", "Cebu",
            "Halifax", "Rotterdam", "Marseille", "Kyoto", "Montevideo", "Ljubljana"],
}
TEAMS = {
    "train": ["City", "United", "Rovers", "Athletic", "Wanderers", "Rangers", "Albion", "Thunder", "Falcons",
              "Sharks", "Lions", "Eagles", "Warriors", "Comets"],
    "ood": ["Hornets", "Pilots", "Mariners", "Stallions", "Vikings", "Bulldogs"],
}
COMPANIES = {
    "train": ["Nordex", "Ambrel", "Quintar", "Veltro", "Solvia", "Kestrel Foods", "Brightline", "Orvane",
              "Tamsin Bank", "Halcyon Motors", "Corvel Systems", "Pinecrest Energy", "Maroway Airlines", "Lumora",
              "Daxter Steel", "Elvana Pharma", "Greywater Capital", "Helix Retail"],
    "ood": ["Zephyr Logistics", "Bluefin Mining", "Cascadia Insurance", "Ostrava Glassworks", "Tarnwell Group",
            "Sundial Textiles", "Ironbark Shipping", "Aldercrest Telecom"],
}

# ---- date-format: where the ISO date {d} sits ------------------------------------------------------------------
DATE_SHAPES = {
    "train": ["Date: {d}", "Due on {d}", "Issued {d}", "Delivery date: {d}", "The deadline is {d}.", "Meeting on {d}",
              "Valid until {d}", "Signed on {d}.", "Paid {d}"],
    "ood": ["Expires {d}", "The invoice is dated {d}.", "Check-in: {d}", "Published {d}", "{d} was the opening day.",
            "Ship by {d}", "Last updated on {d}", "Records begin on {d}."],
}

# ---- unit-convert: {x} the number, {u} km/kg/L, {long} its name, {small} m/g/mL, {small_long} its name ----------
UNIT_SHAPES = {
    "train": ["{x} {long}", "{x} {u} in {small}", "Convert {x} {u}", "{x} {u} to {small}"],
    "ood": ["How many {small} is {x} {u}?", "{x}{u}", "Express {x} {long} in {small_long}", "{x} {long_us}"],
}

# ---- topic: headline templates per label -------------------------------------------------------------------------
TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "train": [
            "{city} {team} beat {team2} {a}-{b} in the cup final",
            "{first} {last} wins the {city} marathon in record time",
            "Coach of {city} {team} resigns after {n} straight defeats",
            "{city} {team} sign striker {first} {last} on a {k}-year deal",
            "Tennis star {first} {last} reaches the semi-finals in {city}",
            "{city} to host the {year} swimming championships",
            "{team} held to a {a}-{a} draw by {team2}",
            "Late goal gives {city} {team} a {a}-{b} win",
            "{first} {last} breaks the national record in the 400 metres",
            "Injury rules {first} {last} out of the {year} season",
            "{city} cyclists dominate the opening stage of the tour",
            "Fans celebrate as {team} win the league title",
            "Goalkeeper {first} {last} saves {k} penalties in the shoot-out",
            "{city} {team} knocked out of the playoffs",
            "Boxer {first} {last} retains the heavyweight title",
            "Olympic team names {n} athletes for the relay squad",
        ],
        "ood": [
            "Shortstop {first} {last} hits two home runs as {team} edge {team2}",
            "{team} captain {first} {last} lifts the trophy in {city}",
            "Sprinter {first} {last} clinches gold at the indoor championships",
            "Ski jumper {first} {last} soars to victory in {city}",
            "{city} {team} fire their manager after a winless month",
            "Golfer {first} {last} sinks a birdie putt to win the open",
            "Hockey: {team} rally from two goals down to beat {team2}",
            "Referee sends off {k} players in a bad-tempered derby",
        ],
    },
    "business": {
        "train": [
            "{company} shares fall {n}% after weak quarterly earnings",
            "{company} agrees to buy {company2} for {n} million dollars",
            "{company} opens {n} new stores across {city}",
            "Chief executive of {company} steps down after {k} years",
            "{company} profits rise {n}% on strong demand",
            "Investors sell {company} stock as interest rates climb",
            "{company} cuts {n}00 jobs to reduce costs",
            "{company} reports record revenue for the {year} fiscal year",
            "Central bank holds interest rates at {k}%",
            "{company} shares jump {n}% on takeover talk",
            "{company} plans a stock market listing in {city}",
            "Inflation slows to {k}% as fuel prices ease",
            "{company} and {company2} announce a merger",
            "Retail sales in {city} grow {k}% in the holiday season",
            "{company} raises prices by {k}% as costs grow",
            "{company} posts a loss of {n} million dollars",
        ],
        "ood": [
            "Hedge fund bets against {company} as its debt pile grows",
            "{company} doubles its dividend after a bumper quarter",
            "Startup founded by {first} {last} raises {n} million in venture funding",
            "Bond yields climb as traders expect another rate hike",
            "Trade deficit widens to {n} billion dollars in {month}",
            "Shareholders of {company} approve a {k} billion dollar buyback",
            "{company} stock tumbles as its sales outlook disappoints",
            "Wholesale prices rise for a {k}th month as factories pass on costs",
        ],
    },
    "science": {
        "train": [
            "Astronomers spot {n} new moons around a distant planet",
            "Researchers in {city} map the genome of a rare frog",
            "New study links sleep to memory in {n} species of birds",
            "Space probe sends first close images of a comet to {city} lab",
            "Physicists in {city} measure the neutron's lifetime more precisely",
            "Fossil found near {city} belongs to a new dinosaur species",
            "Scientists discover a bacterium that eats plastic",
            "Telescope captures the birth of a star {n} light years away",
            "Chemists in {city} build a battery that charges in {k} minutes",
            "Biologists track {n} whales with satellite tags",
            "Study finds bees can count to {k}",
            "Mars rover finds traces of ancient water",
            "Researchers grow a tiny human liver in the lab",
            "Ancient DNA reveals how early farmers reached {city}",
            "Quantum computer solves a chemistry problem in {k} hours",
            "Team led by {first} {last} identifies a new antibiotic",
        ],
        "ood": [
            "Geologists find crystals more than four billion years old",
            "Neuroscientists watch neurons rewire during learning",
            "Laboratory in {city} creates a new superheavy element",
            "Marine biologists describe {n} new species of deep-sea worms",
            "Particle collider detects an unexpected decay",
            "Botanist {first} {last} finds a flower that opens only at night",
            "Meteorite sample contains amino acids, researchers say",
            "Exoplanet's atmosphere shows signs of water vapour",
        ],
    },
    "weather": {
        "train": [
            "Heavy rain expected in {city} on {day}",
            "Temperatures in {city} to reach {n} degrees this {day}",
            "Storm warning issued for the coast near {city}",
            "Snow closes roads around {city} for a {k}th day",
            "Fog delays flights at {city} airport on {day} morning",
            "Heatwave in {city} to last until {day}",
            "Flood alert for rivers near {city} after days of rain",
            "Strong winds knock out power in {city}",
            "Frost expected across the north on {day} night",
            "Sunny skies and mild weather for {city} this weekend",
            "Hailstorm damages cars in {city}",
            "Forecasters predict a wet and cold {day} in {city}",
            "Drought continues as {city} sees no rain for {n} days",
            "Thunderstorms to sweep across {city} on {day} afternoon",
            "Record low temperature of minus {n} degrees in {city}",
            "Blizzard warning for the mountains above {city}",
        ],
        "ood": [
            "Monsoon downpours swamp the streets of {city}",
            "Tornado touches down outside {city}, more twisters possible",
            "Humidity and haze to linger over {city} through {day}",
            "Cold snap brings icy pavements to {city}",
            "Tropical cyclone upgraded to category {k} as it nears the coast",
            "Gusts of {n} mph forecast for {city} as a gale arrives",
            "Sleet and freezing drizzle expected in {city} overnight",
            "Dust storm turns the sky orange over {city}",
        ],
    },
    "politics": {
        "train": [
            "Parliament votes on the new housing bill on {day}",
            "Mayor {first} {last} announces a bid for a second term in {city}",
            "Minister {first} {last} resigns over the {company} contract",
            "Voters in {city} head to the polls on {day}",
            "Opposition leader {first} {last} calls for an early election",
            "Senate passes the {year} budget after a {k}-day debate",
            "President signs the new immigration law",
            "Coalition talks collapse in {city}",
            "Government announces a tax cut for families",
            "{first} {last} elected leader of the Green Party",
            "Prime minister faces a confidence vote on {day}",
            "Lawmakers debate the {year} defence bill",
            "City council of {city} approves a new transport plan",
            "Election results delayed in {city} after a recount",
            "Foreign minister {first} {last} visits {city} for peace talks",
            "Party members choose a new leader on {day}",
        ],
        "ood": [
            "Governor {first} {last} vetoes the school funding bill",
            "Referendum on electoral reform set for {month}",
            "Cabinet reshuffle sees {first} {last} named finance minister",
            "Campaign rally in {city} draws thousands ahead of the vote",
            "Legislature overrides a veto on the {year} spending plan",
            "Diplomats from {n} nations sign a treaty in {city}",
            "Polls show the ruling party trailing before the ballot",
            "Impeachment inquiry calls {first} {last} to testify",
        ],
    },
}

# ---- extract-name: sentences naming one person -------------------------------------------------------------------
NAME_TEMPLATES = {
    "train": [
        "Ticket {n}: {first} {last} reports that the printer on floor {k} is jammed.",
        "Please send the invoice to {first} {last} in {city} by {day}.",
        "On {day}, {first} {last} from {company} called about order {n}.",
        "The meeting moves to {day}; {first} {last} will chair it.",
        "Delivery for {first} {last}, {n} Harbour Street, {city}.",
        "{company} has hired {first} {last} as head of sales in {city}.",
        "Room {n} is booked for {first} {last} from {day} to {day2}.",
        "Thanks to {first} {last} for fixing the build on {day}.",
        "{first} {last} will present the quarterly report on {day}.",
        "Contact: {first} {last}, {company}, {city}",
        "Dear {first} {last}, your order {n} has shipped.",
        "The award goes to {first} {last} of {city}.",
        "Patient {first} {last} is due for a check-up on {day}.",
        "Passenger {first} {last}, please go to gate {k}.",
        "{first} {last} ({company}) joined the call late.",
        "Interview with {first} {last}, the new coach in {city}.",
        "Our driver {first} {last} will arrive at {k} pm.",
        "Author: {first} {last}",
        "Reminder: {first} {last} is on leave until {day}.",
        "Dr. {first} {last} sees patients in {city} on {day}.",
    ],
    "ood": [
        "After a long debate, the committee thanked {first} {last}.",
        "Yesterday the keys were returned by {first} {last}.",
        "Is {first} {last} still waiting in the lobby?",
        "Professor {first} {last} has published a new book about {city}.",
        "\"We are ready,\" said {first} {last} on {day}.",
        "The lost wallet belongs to {first} {last}, the police in {city} said.",
        "Congratulations to {first} {last} on twenty years at {company}!",
        "Parcel {n} could not be delivered; recipient: {first} {last}.",
        "Without {first} {last}, the {city} office would have closed.",
        "Please welcome our new neighbour, {first} {last}.",
        "Best regards from {city}, {first} {last}",
        "The lease was signed by {first} {last} and the landlord.",
    ],
}

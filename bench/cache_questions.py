"""Hand-written question sets for bench/cache.py (semantic response cache, W5 of WORKLOADS.md).

BASES: (question, [paraphrases with the same answer], near-miss with a different answer). The
near-miss keeps most words and the structure of its base but asks for something else (another
entity, number, unit, attribute or direction), so a good semantic cache must not serve the base's
answer to it. EXTRAS: unrelated first-time questions that should simply miss.
"""

from __future__ import annotations

BASES: list[tuple[str, list[str], str]] = [
    (
        "What is the capital of France?",
        ["Which city is the capital of France?", "Tell me the capital city of France."],
        "What is the capital of Germany?",
    ),
    (
        "How do I reverse a list in Python?",
        [
            "What's the way to reverse a Python list?",
            "How can I reverse the order of a list in Python?",
        ],
        "How do I reverse a list in JavaScript?",
    ),
    (
        "What is the boiling point of water in Celsius?",
        [
            "At what temperature in Celsius does water boil?",
            "Water boils at how many degrees Celsius?",
        ],
        "What is the boiling point of water in Fahrenheit?",
    ),
    (
        "Who wrote the novel Pride and Prejudice?",
        ["Who is the author of Pride and Prejudice?", "Which writer wrote Pride and Prejudice?"],
        "Who wrote the novel War and Peace?",
    ),
    (
        "What is the largest planet in our solar system?",
        [
            "Which planet is the biggest in the solar system?",
            "Name the largest planet of our solar system.",
        ],
        "What is the smallest planet in our solar system?",
    ),
    (
        "How many days are there in a leap year?",
        ["How many days does a leap year have?", "What is the number of days in a leap year?"],
        "How many days are there in a common year that is not a leap year?",
    ),
    (
        "What is 12 times 12?",
        ["What do you get when you multiply 12 by 12?", "Compute 12 times 12."],
        "What is 12 times 13?",
    ),
    (
        "How do I create a new branch in git?",
        ["What is the git command to create a new branch?", "How can I make a new git branch?"],
        "How do I delete a branch in git?",
    ),
    (
        "What is the chemical symbol for gold?",
        ["Which chemical symbol stands for gold?", "What's gold's symbol on the periodic table?"],
        "What is the chemical symbol for silver?",
    ),
    (
        "When did World War II end?",
        ["In what year did World War II end?", "What year marked the end of World War II?"],
        "When did World War I end?",
    ),
    (
        "How do I sort a list in ascending order in Python?",
        [
            "How can I sort a Python list from smallest to largest?",
            "What is the way to sort a list ascending in Python?",
        ],
        "How do I sort a list in descending order in Python?",
    ),
    (
        "What is the speed of light in a vacuum?",
        ["How fast does light travel in a vacuum?", "What is the velocity of light in vacuum?"],
        "What is the speed of sound in air?",
    ),
    (
        "How many legs does a spider have?",
        ["How many legs do spiders have?", "What is the number of legs on a spider?"],
        "How many legs does an insect have?",
    ),
    (
        "What is the tallest mountain in the world?",
        ["Which mountain is the highest on Earth?", "Name the world's tallest mountain."],
        "What is the tallest mountain in Africa?",
    ),
    (
        "How do I convert a string to an integer in Python?",
        [
            "How can I turn a string into an int in Python?",
            "What's the way to parse a string as an integer in Python?",
        ],
        "How do I convert an integer to a string in Python?",
    ),
    (
        "What is the square root of 144?",
        ["What's the square root of 144?", "Calculate the square root of 144."],
        "What is the square root of 169?",
    ),
    (
        "Who painted the Mona Lisa?",
        ["Which artist painted the Mona Lisa?", "Who was the painter of the Mona Lisa?"],
        "Who painted The Starry Night?",
    ),
    (
        "What is the main ingredient in guacamole?",
        ["What is guacamole mainly made from?", "Which ingredient is the base of guacamole?"],
        "What is the main ingredient in hummus?",
    ),
    (
        "How many continents are there on Earth?",
        ["How many continents does the Earth have?", "What is the number of continents on Earth?"],
        "How many oceans are there on Earth?",
    ),
    (
        "What is the freezing point of water in Fahrenheit?",
        [
            "At what temperature in Fahrenheit does water freeze?",
            "Water freezes at how many degrees Fahrenheit?",
        ],
        "What is the freezing point of water in Kelvin?",
    ),
    (
        "How do I exit the vim editor?",
        ["What's the way to quit vim?", "How can I close the vim editor?"],
        "How do I exit the nano editor?",
    ),
    (
        "What is the currency of Japan?",
        ["Which currency is used in Japan?", "What money do they use in Japan?"],
        "What is the currency of China?",
    ),
    (
        "How many bytes are in a kilobyte?",
        ["How many bytes make up one kilobyte?", "A kilobyte contains how many bytes?"],
        "How many bytes are in a megabyte?",
    ),
    (
        "What language is spoken in Brazil?",
        ["Which language do people speak in Brazil?", "What is the official language of Brazil?"],
        "What language is spoken in Argentina?",
    ),
    (
        "How do I list all running Docker containers?",
        [
            "What command shows all running Docker containers?",
            "How can I see the Docker containers that are running?",
        ],
        "How do I stop all running Docker containers?",
    ),
    (
        "What is the longest river in the world?",
        ["Which river is the longest on Earth?", "Name the world's longest river."],
        "What is the longest river in Europe?",
    ),
    (
        "What year did the first person walk on the Moon?",
        [
            "In which year did humans first walk on the Moon?",
            "When did a person first walk on the Moon?",
        ],
        "What year did the first person reach the summit of Mount Everest?",
    ),
    (
        "What is the time complexity of binary search?",
        [
            "What's the big O complexity of binary search?",
            "How fast is binary search in big O notation?",
        ],
        "What is the time complexity of linear search?",
    ),
    (
        "How many players are on a soccer team on the field?",
        [
            "How many players does a soccer team have on the field?",
            "What is the number of players per side in soccer?",
        ],
        "How many players are on a basketball team on the court?",
    ),
    (
        "What is the hardest natural substance?",
        [
            "Which natural material is the hardest?",
            "What is the hardest naturally occurring substance?",
        ],
        "What is the softest mineral?",
    ),
    (
        "How do I check my Python version?",
        [
            "How can I find out which version of Python I have?",
            "What command shows the installed Python version?",
        ],
        "How do I check my Node version?",
    ),
    (
        "What is the capital of Australia?",
        ["Which city is the capital of Australia?", "Tell me the capital city of Australia."],
        "What is the largest city in Australia?",
    ),
    (
        "How many hours are in a week?",
        ["How many hours does a week have?", "What is the total number of hours in one week?"],
        "How many minutes are in a week?",
    ),
    (
        "What gas do plants absorb from the air?",
        [
            "Which gas do plants take in from the atmosphere?",
            "What gas do plants absorb from the atmosphere?",
        ],
        "What gas do plants release into the air?",
    ),
    (
        "What is the default port for HTTPS?",
        ["Which port does HTTPS use by default?", "What port number is the HTTPS default?"],
        "What is the default port for SSH?",
    ),
    (
        "How do I undo the last commit in git?",
        [
            "What is the way to undo my last git commit?",
            "How can I revert the most recent commit in git?",
        ],
        "How do I undo the last commit in Mercurial?",
    ),
    (
        "What is the population of Canada?",
        ["How many people live in Canada?", "What's the population of Canada?"],
        "What is the population of Mexico?",
    ),
    (
        "Who discovered penicillin?",
        ["Who was the discoverer of penicillin?", "Which scientist discovered penicillin?"],
        "Who discovered insulin?",
    ),
    (
        "What is the sum of the angles in a triangle?",
        [
            "What do the angles of a triangle add up to?",
            "How many degrees do a triangle's angles sum to?",
        ],
        "What is the sum of the angles in a square?",
    ),
    (
        "How long does it take to boil an egg?",
        ["How many minutes should I boil an egg?", "How long should an egg be boiled?"],
        "How long does it take to bake a potato?",
    ),
]

EXTRAS: list[str] = [
    "Explain how a hash table handles collisions.",
    "What causes the seasons on Earth?",
    "Write a haiku about autumn leaves.",
    "What is the difference between TCP and UDP?",
    "How does photosynthesis work?",
    "Give me three tips for better sleep.",
    "What is a closure in JavaScript?",
    "Why is the sky blue?",
    "Summarize the plot of Hamlet in two sentences.",
    "What does HTTP status code 404 mean?",
    "How do vaccines train the immune system?",
    "What is the Pythagorean theorem?",
    "Recommend a good stretching routine for runners.",
    "What is the role of mitochondria in a cell?",
    "How do I make a simple tomato sauce?",
    "What is inflation in economics?",
    "Describe the water cycle.",
    "What is a black hole?",
    "How does a bicycle stay upright?",
    "What is the difference between a virus and a bacterium?",
    "Translate 'good morning' into Spanish.",
    "What is recursion in programming?",
    "How do tides work?",
    "What are the primary colors?",
    "How do I write a for loop in Rust?",
    "What is the GDP of a country?",
    "Why do cats purr?",
    "What is the purpose of a load balancer?",
    "Explain what a mortgage is.",
    "What are prime numbers?",
    "How does a refrigerator keep food cold?",
    "What is the function of the liver?",
    "How do I center a div in CSS?",
    "What is machine learning?",
    "Why do leaves change color in the fall?",
    "What is the difference between weather and climate?",
    "How do noise-cancelling headphones work?",
    "What is a haiku?",
    "Explain the rules of chess castling.",
    "What is an API?",
]

# Written after the guard rules and default threshold were chosen and never used to tune them:
# bench/cache.py --set heldout measures how the cache generalises beyond the set it was tuned on.
HELDOUT_BASES: list[tuple[str, list[str], str]] = [
    (
        "What is the capital of Italy?",
        ["Which city is Italy's capital?", "Name the capital city of Italy."],
        "What is the capital of Spain?",
    ),
    (
        "How do I remove duplicates from a list in Python?",
        [
            "How can I deduplicate a Python list?",
            "What's the best way to drop duplicate items from a list in Python?",
        ],
        "How do I remove duplicates from an array in JavaScript?",
    ),
    (
        "How many bones are in the adult human body?",
        [
            "How many bones does an adult human have?",
            "What is the number of bones in an adult's body?",
        ],
        "How many bones are in a baby's body?",
    ),
    (
        "Who invented the telephone?",
        ["Who is credited with inventing the telephone?", "Which inventor created the telephone?"],
        "Who invented the light bulb?",
    ),
    (
        "What is the distance from the Earth to the Moon?",
        ["How far away is the Moon from Earth?", "How far is the Moon from the Earth?"],
        "What is the distance from the Earth to the Sun?",
    ),
    (
        "How do I rename a file in Linux?",
        [
            "What command renames a file on Linux?",
            "How can I rename a file from the Linux terminal?",
        ],
        "How do I rename a file in Windows?",
    ),
    (
        "What is the atomic number of carbon?",
        ["What's carbon's atomic number?", "Which atomic number does carbon have?"],
        "What is the atomic number of oxygen?",
    ),
    (
        "How many teaspoons are in a tablespoon?",
        ["How many teaspoons make one tablespoon?", "A tablespoon equals how many teaspoons?"],
        "How many tablespoons are in a cup?",
    ),
    (
        "What is the most spoken language in the world?",
        [
            "Which language has the most speakers worldwide?",
            "What language do the most people in the world speak?",
        ],
        "What is the least spoken language in the world?",
    ),
    (
        "How do I make a text bold in Markdown?",
        ["How can I write bold text in Markdown?", "What is the Markdown syntax for bold?"],
        "How do I make a text italic in Markdown?",
    ),
    (
        "When was the Eiffel Tower built?",
        [
            "In what year was the Eiffel Tower constructed?",
            "What year was the Eiffel Tower completed?",
        ],
        "When was the Statue of Liberty built?",
    ),
    (
        "What is the factorial of 5?",
        ["Compute the factorial of 5.", "What does 5 factorial equal?"],
        "What is the factorial of 6?",
    ),
    (
        "How do I merge two dictionaries in Python?",
        [
            "What's the way to combine two dicts in Python?",
            "How can I merge a pair of Python dictionaries?",
        ],
        "How do I compare two dictionaries in Python?",
    ),
    (
        "What is the largest ocean on Earth?",
        ["Which ocean is the biggest on Earth?", "Name the largest ocean in the world."],
        "What is the deepest ocean trench on Earth?",
    ),
    (
        "How long is a marathon?",
        ["What is the length of a marathon?", "How many miles is a marathon race?"],
        "How long is a half marathon?",
    ),
    (
        "What vitamin does sunlight help the body produce?",
        [
            "Which vitamin does the body make from sunlight?",
            "Sunlight helps us produce which vitamin?",
        ],
        "What vitamin is found in citrus fruits?",
    ),
    (
        "How do I increase the font size in CSS?",
        ["How can I make the font bigger with CSS?", "What CSS property increases the text size?"],
        "How do I decrease the font size in CSS?",
    ),
    (
        "What is the freezing point of salt water?",
        [
            "At what temperature does salt water freeze?",
            "When does seawater freeze, temperature-wise?",
        ],
        "What is the boiling point of salt water?",
    ),
    (
        "Who was the first president of the United States?",
        [
            "Who served as the first US president?",
            "Which person was the first president of the United States?",
        ],
        "Who was the second president of the United States?",
    ),
    (
        "How many strings does a standard guitar have?",
        [
            "How many strings are on a normal guitar?",
            "What is the number of strings on a standard guitar?",
        ],
        "How many strings does a standard violin have?",
    ),
]

HELDOUT_EXTRAS: list[str] = [
    "What is the difference between RAM and storage?",
    "How do earthquakes happen?",
    "Write a limerick about a cat.",
    "What is a good name for a coffee shop?",
    "How does compound interest work?",
    "What is the theory of evolution?",
    "Explain what DNS does.",
    "How do I care for a succulent?",
    "What is a sonnet?",
    "Why do we dream?",
    "What is quantum computing?",
    "How do electric cars work?",
    "What is the stock market?",
    "How do birds migrate?",
    "What is a neural network?",
    "How should I prepare for a job interview?",
    "What is the greenhouse effect?",
    "Why is exercise good for the brain?",
    "What is blockchain?",
    "How do I brew pour-over coffee?",
]
